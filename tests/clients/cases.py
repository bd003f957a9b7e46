"""Real reranking client libraries, each used as its documentation shows, unchanged but for
the base URL, a dummy API key and the served model's name. Runs in the client-library venv
(tests/clients/requirements.txt; no torch), started by tests/test_client_libraries.py:

    python cases.py BASE_URL MODEL [CASE ...]

runs the cases named (default: all) and prints, as its last line, one JSON object: case name -> what the
library handed back, normalised to {"results": [{"index", "score", "text"?}], "extra": {...}}
in the library's order, or {"error": "..."} where the library raised. All cases run in one
process, so each library is imported once."""
from __future__ import annotations

import json
import sys
import time
import warnings

from quickstart import DOCS, QUERY, TOP_N

warnings.filterwarnings("ignore")

KEY = "dummy-key"  # the test server has no API keys: any bearer token passes
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def result(index: int, score: float, text: str | None = None) -> dict:
    out = {"index": index, "score": score}
    if text is not None:
        out["text"] = text
    return out


# ---------------------------------------------------------------- cohere


@case
def cohere_v1(base, model):
    import cohere

    co = cohere.Client(api_key=KEY, base_url=base)
    response = co.rerank(model=model, query=QUERY, documents=DOCS, top_n=TOP_N)
    return [result(r.index, r.relevance_score) for r in response.results]


@case
def cohere_v1_documents(base, model):
    """return_documents: the v1 SDK models a document as {"text": ...} (needs --document-objects)."""
    import cohere

    co = cohere.Client(api_key=KEY, base_url=base)
    response = co.rerank(model=model, query=QUERY, documents=DOCS, top_n=TOP_N, return_documents=True)
    return [result(r.index, r.relevance_score, r.document.text) for r in response.results]


@case
def cohere_v2(base, model):
    import cohere

    co = cohere.ClientV2(api_key=KEY, base_url=base)
    response = co.rerank(model=model, query=QUERY, documents=DOCS, top_n=TOP_N)
    return [result(r.index, r.relevance_score) for r in response.results]


@case
def langchain_cohere(base, model):
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(cohere_api_key=KEY, base_url=base, model=model, top_n=TOP_N)
    compressed = reranker.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    return [result(DOCS.index(d.page_content), d.metadata["relevance_score"], d.page_content) for d in compressed]


# ---------------------------------------------------------------- llama-index


def _nodes():
    from llama_index.core.schema import NodeWithScore, TextNode

    return [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCS]


def _from_nodes(nodes):
    return [result(DOCS.index(n.node.get_content()), n.score, n.node.get_content()) for n in nodes]


@case
def llama_index_cohere(base, model):
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    reranker = CohereRerank(api_key=KEY, base_url=base, model=model, top_n=TOP_N)
    return _from_nodes(reranker.postprocess_nodes(_nodes(), query_str=QUERY))


@case
def llama_index_jina(base, model):
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    reranker = JinaRerank(api_key=KEY, base_url=base + "/v1", model=model, top_n=TOP_N)
    return _from_nodes(reranker.postprocess_nodes(_nodes(), query_str=QUERY))


@case
def llama_index_tei(base, model):
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    reranker = TextEmbeddingInference(base_url=base, top_n=TOP_N)
    return _from_nodes(reranker.postprocess_nodes(_nodes(), query_str=QUERY))


# ---------------------------------------------------------------- haystack


def _haystack_docs():
    from haystack import Document

    return [Document(content=d) for d in DOCS]


def _from_haystack(documents):
    return [result(DOCS.index(d.content), d.score, d.content) for d in documents]


@case
def haystack_cohere(base, model):
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.cohere import CohereRanker

    ranker = CohereRanker(api_key=Secret.from_token(KEY), model=model, api_base_url=base, top_k=TOP_N)
    return _from_haystack(ranker.run(query=QUERY, documents=_haystack_docs())["documents"])


@case
def haystack_jina(base, model):
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.jina import JinaRanker

    ranker = JinaRanker(api_key=Secret.from_token(KEY), model=model, base_url=base + "/v1/rerank", top_k=TOP_N)
    return _from_haystack(ranker.run(query=QUERY, documents=_haystack_docs())["documents"])


@case
def haystack_tei(base, model):
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=base, top_k=TOP_N, token=Secret.from_token(KEY))
    return _from_haystack(ranker.run(query=QUERY, documents=_haystack_docs())["documents"])


@case
def haystack_tei_raw_left(base, model):
    """raw_scores, and truncation_direction (sent with truncate: true)."""
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker
    from haystack_integrations.components.rankers.huggingface_api.ranker import TruncationDirection

    ranker = HuggingFaceTEIRanker(url=base, top_k=TOP_N, raw_scores=True, token=Secret.from_token(KEY))
    documents = ranker.run(query=QUERY, documents=_haystack_docs(), truncation_direction=TruncationDirection.LEFT)
    return _from_haystack(documents["documents"])


@case
def haystack_tei_error(base, model):
    """A refusal in TEI's {"error", "error_type"} shape surfaces as the ranker's own error."""
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=base, top_k=TOP_N, token=Secret.from_token(KEY), max_retries=0)
    try:
        # nine distinct texts (the ranker drops duplicates), over the test server's --max-documents 8
        ranker.run(query=QUERY, documents=[Document(content=f"text {i}") for i in range(9)])
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        return {"results": [], "extra": {"error": f"{type(e).__name__}: {e}"}}
    return {"results": [], "extra": {"error": None}}


# ---------------------------------------------------------------- rerankers


def _rerankers(provider, url, model):
    from rerankers import Reranker

    ranker = Reranker(model, model_type=provider, api_key=KEY, url=url, verbose=0)
    return [result(r.document.doc_id, r.score, r.document.text) for r in ranker.rank(QUERY, DOCS).results]


@case
def rerankers_cohere(base, model):
    return _rerankers("cohere", base + "/v1/rerank", model)


@case
def rerankers_jina(base, model):
    return _rerankers("jina", base + "/v1/rerank", model)


@case
def rerankers_tei(base, model):
    return _rerankers("text-embeddings-inference", base + "/rerank", model)


# ---------------------------------------------------------------- litellm


def _litellm(provider, base, model, **kwargs):
    import litellm

    response = litellm.rerank(model=f"{provider}/{model}", query=QUERY, documents=DOCS, top_n=TOP_N,
                              api_base=base, api_key=KEY, **kwargs)
    out = []
    for r in response.results:
        document = r.get("document")
        text = document.get("text") if isinstance(document, dict) else document
        out.append(result(r["index"], r["relevance_score"], text))
    return out


@case
def litellm_cohere(base, model):
    return _litellm("cohere", base, model, return_documents=True)


@case
def litellm_infinity(base, model):
    return _litellm("infinity", base, model, return_documents=True)


@case
def litellm_jina_ai(base, model):
    return _litellm("jina_ai", base, model, return_documents=True)


@case
def litellm_hosted_vllm(base, model):
    return _litellm("hosted_vllm", base, model, return_documents=True)


@case
def litellm_huggingface(base, model):
    return _litellm("huggingface", base, model, return_documents=True)


def run(name: str, base: str, model: str) -> dict:
    started = time.perf_counter()
    try:
        out = CASES[name](base, model)
    except Exception as e:  # noqa: BLE001 - reported to the test, which decides
        out = {"error": f"{type(e).__name__}: {e}"}
    print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return {"results": out, "extra": {}} if isinstance(out, list) else out


def main() -> None:
    base, model, *names = sys.argv[1:]
    results = {name: run(name, base, model) for name in names or CASES}
    print("\n" + json.dumps(results))  # the last line (the libraries may print too)


if __name__ == "__main__":
    main()
