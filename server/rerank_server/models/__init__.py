"""The model classes, one short file per forward (``encoder.py``: XLM-RoBERTa, RoBERTa and BERT
cross-encoders; ``qwen3.py``: Qwen3 as an LLM reranker), and ``registry.py``: the one table from a
checkpoint's architecture name to the class that runs it and the family's data."""
