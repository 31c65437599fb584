"""Plain-PyTorch models: the VQGAN image tokenizer, the CM3 document format and text tokenizers."""
