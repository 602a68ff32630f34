"""knnlm: nearest-neighbour language models, and the analyses of
"Why do Nearest Neighbor Language Models Work?" (Xu, Alon, Neubig, ICML 2023)."""

__version__ = "0.1.0"
