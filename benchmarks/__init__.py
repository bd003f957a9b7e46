"""Forward and end-to-end benchmarks against the Hugging Face baseline."""
