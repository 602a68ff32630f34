"""knnlm: nearest-neighbour language models, and the analyses of
"Why do Nearest Neighbor Language Models Work?" (Xu, Alon, Neubig, ICML 2023)."""

__version__ = "0.1.0"


def __getattr__(name):
    # the HF integration and the Python API import transformers: loaded on first use only
    if name == "KNNLogitsProcessor":
        from .hf_generate import KNNLogitsProcessor
        return KNNLogitsProcessor
    if name in ("Datastore", "KNNLM"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'knnlm' has no attribute {name!r}")
