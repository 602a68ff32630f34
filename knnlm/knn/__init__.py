"""The retrieval side: the kNN-LM math (:mod:`.math`), datastores, FAISS indexes and their
sharded builds, search and score modes, eval-lm's per-token kNN scoring, retrieval caches
and offline sweeps."""
