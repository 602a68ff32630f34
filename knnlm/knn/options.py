"""The kNN-LM flags shared by `eval-lm` and `generate` (names of the original code)."""
from __future__ import annotations

from dataclasses import dataclass

from ..util import UserError, flag
from .mode import SIM_FUNCS, ScoreMode


@dataclass(kw_only=True)
class KnnOptions:
    knnlm: bool = flag(False, "use the kNN-LM: interpolate with a datastore's neighbours")
    dstore_filename: str | None = flag(None, "--knnlm: datastore directory")
    indexfile: str | None = flag(None, "--knnlm: FAISS index (default: the datastore's "
                                 "index_<keytype>_<metric>.faiss)")
    knn_keytype: str = flag("att", "--knnlm: keytype of the queries (att/last_ffn_input, "
                            "ffn/last_linear_input, layer:N = output of layer N before any final "
                            "norm); eval-lm --save-knnlm-dstore: "
                            "the keytypes saved, comma-separated")
    k: int | None = flag(None, "--knnlm: neighbours per query (default: the index's tuned "
                         "settings, else 1024)")
    lmbda: float | None = flag(None, "--knnlm: interpolation weight of p_kNN (default: the "
                               "index's tuned settings (knnlm tune), else 0.25)")
    knn_temp: float | None = flag(None, "--knnlm: softmax temperature over neighbour scores "
                                  "(default: the index's tuned settings, else 1)")
    probe: int = flag(8, "--knnlm: IVF lists probed per query (nprobe; the original code's "
                      "default)")
    k_factor: float | None = flag(None, "--knnlm: an index with a refine stage (factory "
                                  "suffix RFlat / Refine(SQfp16)): its base index is searched "
                                  "for k x this many candidates, re-ranked exactly (FAISS "
                                  "k_factor; default: the index's, 1)")
    knn_sim_func: str | None = flag(None, "--knnlm: scores of the neighbours: l2 / dot (exact "
                                    "L2 / inner products from the stored keys), "
                                    "do_not_recomp_l2 (the distances the search returned); "
                                    "default: the index's tuned settings, else l2 for an L2 "
                                    "index, FAISS's scores for an IP index",
                                    choices=SIM_FUNCS)
    faiss_metric_type: str = flag("l2", "--knnlm: metric of the index", choices=("l2", "ip"))
    exact_search: bool = flag(False, "--knnlm: exact neighbours by brute force (no index)")
    ignore_top: bool = flag(False, "--knnlm: drop the nearest neighbour (scoring the "
                            "datastore's own text)")
    load_keys: bool = flag(True, "--knnlm: read the stored keys (needed to recompute "
                           "distances)", negative=("--no-load-keys",))
    move_dstore_to_mem: bool = flag(False, "--knnlm: load keys and values into RAM")
    index_mmap: bool = flag(False, "--knnlm: memory-map the index's codes from its file "
                            "instead of reading them into RAM (indexes larger than the memory)")
    knnlm_gpu: bool = flag(False, "--knnlm: search on GPU (a FAISS GPU build, else the torch "
                           "backend; brute force with --exact-search); without a GPU, the CPU")
    knnlm_gpus: int = flag(0, "--knnlm-gpu: GPUs the index goes to (0: all)")
    gpu_shard: bool = flag(False, "--knnlm-gpu: shard the index across the GPUs instead of "
                           "cloning it to each (fp16 lookup tables either way)")
    knn_backend: str = flag("auto", "--knnlm: search with FAISS, or with the torch backend "
                            "over the index's data (no faiss-gpu needed); auto: FAISS, or "
                            "torch on the GPUs when --knnlm-gpu finds no faiss-gpu",
                            choices=("auto", "faiss", "torch"))

    retomaton: bool = flag(False, "--knnlm: RetoMaton pointers: follow the last step's "
                           "neighbours that predicted its token to their successors, and search "
                           "only when fewer than --min-knns remain")
    min_knns: int = flag(1, "--retomaton: search when fewer pointers than this remain")
    max_knns: int | None = flag(None, "--retomaton: pointers kept per step (default: --k)")
    members: str | None = flag(None, "--retomaton: clusters of the entries (knnlm "
                               "cluster-dstore): pointers are joined by their clusters' members")
    gate: str | None = flag(None, "--knnlm: adaptive retrieval: search only the tokens this "
                            "gate (knnlm train-gate) ranks highest; the others keep p_LM")
    retrieval_fraction: float | None = flag(None, "--gate: share of tokens to search (through "
                                            "the gate's λ̂ quantiles on its training tokens)")
    gate_threshold: float | None = flag(None, "--gate: search tokens whose λ̂ is at least this")
    gate_lambda: bool = flag(False, "--gate: interpolate searched tokens with λ̂ instead of "
                             "the fixed λ")
    heartbeat_timeout: float = flag(120.0, "torchrun: seconds without a sign of life from a "
                                    "rank before the others stop (one line each, no hang)")

    def score_mode(self) -> ScoreMode:
        """Which neighbours and which scores these flags select (:mod:`knnlm.knn.mode`)."""
        return ScoreMode.from_flags(self.knn_sim_func, self.faiss_metric_type, self.exact_search)

    def check_knn(self) -> None:
        """Validate the kNN flags (call when --knnlm is on). λ, T and k may be None until
        :func:`knnlm.knn.tuned.resolve_settings` fills them."""
        if not self.dstore_filename:
            raise UserError("--knnlm needs --dstore-filename DIR")
        if (self.k is not None and self.k <= 0) or self.probe <= 0:
            raise UserError("--k and --probe must be > 0")
        if self.k_factor is not None and not self.k_factor >= 1:
            raise UserError(f"--k-factor must be >= 1, got {self.k_factor}")
        if self.k_factor is not None and self.exact_search:
            raise UserError("--k-factor re-ranks an index's candidates; --exact-search has none")
        if self.lmbda is not None and not 0.0 <= self.lmbda <= 1.0:
            raise UserError(f"--lmbda must be in [0, 1], got {self.lmbda}")
        if self.knn_temp is not None and not self.knn_temp > 0:
            raise UserError(f"--knn-temp must be > 0, got {self.knn_temp}")
        if not self.heartbeat_timeout > 0:
            raise UserError("--heartbeat-timeout must be > 0 seconds")
        if self.knnlm_gpus < 0:
            raise UserError(f"--knnlm-gpus must be >= 0, got {self.knnlm_gpus}")
        if self.knn_backend not in ("auto", "faiss", "torch"):
            raise UserError(f"--knn-backend must be auto, faiss or torch, got {self.knn_backend!r}")
        if self.retomaton or self.members:
            from .pointers import check_pointer_flags
            check_pointer_flags(self)
        if self.gate:
            if (self.retrieval_fraction is None) == (self.gate_threshold is None):
                raise UserError("--gate needs exactly one of --retrieval-fraction and "
                                "--gate-threshold")
            if self.retrieval_fraction is not None and not 0 <= self.retrieval_fraction <= 1:
                raise UserError(f"--retrieval-fraction must be in [0, 1], got "
                                f"{self.retrieval_fraction}")
            if self.retomaton or self.exact_search:
                raise UserError("--gate goes with an index search alone (not --retomaton or "
                                "--exact-search)")
        elif self.retrieval_fraction is not None or self.gate_threshold is not None \
                or self.gate_lambda:
            raise UserError("--retrieval-fraction, --gate-threshold and --gate-lambda need "
                            "--gate DIR")
