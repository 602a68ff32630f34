"""The retrieval side: the kNN-LM math (:mod:`.math`), datastores, FAISS indexes (built in
shards, trained by FAISS or by torch k-means, planned with `knnlm plan`), search — FAISS,
the torch backend over an index's data, exact search in one pass over the keys — and score
modes, eval-lm's per-token kNN scoring, retrieval caches and offline sweeps."""
