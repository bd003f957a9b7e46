"""Rerank service for BAAI/bge-reranker-v2-m3: gRPC + REST over an unpadded XLM-RoBERTa forward."""
__version__ = "0.1.0"
