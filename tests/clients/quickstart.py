"""The seed document's quick-start request, shared by the tests and by cases.py (which runs in
the client-library venv, without the test suite's imports): constants only, no side effects."""

QUERY = "What is machine learning?"
DOCS = [
    "Machine learning is a subset of artificial intelligence.",
    "The weather today is sunny and warm.",
    "Deep learning uses neural networks with multiple layers.",
    "Python is a popular programming language.",
]
TOP_N = 3
