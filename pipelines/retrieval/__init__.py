"""Retrieval stages: CLIP embedding, FAISS index, neighbour retrieval, recall."""
