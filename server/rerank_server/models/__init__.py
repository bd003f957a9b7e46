"""The model classes, one short file per forward (``encoder.py``: XLM-RoBERTa, RoBERTa and BERT
cross-encoders; ``modernbert.py`` and ``deberta_v2.py``: encoders whose attention differs from BERT's;
``qwen3.py``: Qwen3 as an LLM reranker), and ``registry.py``: the one table from a
checkpoint's architecture name to the class that runs it and the family's data."""
