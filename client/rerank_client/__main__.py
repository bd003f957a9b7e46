"""python -m rerank_client "query" doc1 doc2 ... (see rerank_client.cli)."""
import sys

from rerank_client.cli import main

sys.exit(main())
