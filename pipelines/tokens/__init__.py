"""Tokenization: VQGAN image codes and BPE caption tokens."""
