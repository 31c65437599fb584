"""Image tokenizer families (taming VQGAN, LlamaGen VQ): each reads its own checkpoint layout into one VQGAN."""
