"""The `knnlm` command: one subcommand per pipeline stage.

    knnlm data fetch shakespeare --dest DIR     corpora
    knnlm preprocess ...                        tokenize + binarize into a data-bin
    knnlm train DATA_BIN ...                    train a Transformer LM
    knnlm eval-lm DATA_BIN --path CKPT ...      perplexity (fairseq eval-lm semantics)
    knnlm build-dstore DATA_BIN --path CKPT ... datastore of keys and values
    knnlm build-index --dstore-dir DIR ...      FAISS index over one keytype
    knnlm plan --dstore-size N --dimension D    disk, RAM and time of a datastore and index
    knnlm prune-dstore --dstore-dir D --out D2  a smaller weighted datastore (merge, random, kmeans)
    knnlm reduce-dstore --dstore-dir D --out D2 --pca-dim d   PCA-reduced keys
    knnlm cluster-dstore --dstore-dir D ...     clusters of the keys (generate/eval --members)
    knnlm sweep --cache DIR ...                 offline sweeps over a retrieval cache
    knnlm centroids --dstore-dir DIR --out D    centroids of datastore keys (eval-lm --load-centroids)
    knnlm tune DATA_BIN --path CKPT ...         best λ, T, k, score mode of an index -> tuned.json
    knnlm train-gate --cache DIR --out DIR      adaptive retrieval's gate (eval-lm --gate)
    knnlm analyze DATA_BIN --path CKPT ...      the paper's analyses in one results directory
    knnlm allot-embeddings DATA_BIN --out F     extra output rows per token (for train)
    knnlm loss-weights DATA_BIN ... --out F     per-token loss weights (train --weighted-loss)
    knnlm generate DATA_BIN --path CKPT ...     continue prompts (greedy or sampling), kNN-LM too
    knnlm neighbors DATA_BIN --path CKPT ...    the neighbours of each position of a text
    knnlm demo                                  the whole pipeline on Shakespeare

Every subcommand is a dataclass config plus a ``main(cfg)``; errors a user can fix end
with one line on stderr and exit status 2.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

from .guard import describe_os_error
from .util import UserError, parse_config

# name -> (module, config class, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("knnlm.data.corpora", "FetchConfig", "fetch a corpus into {train,valid,test}.txt"),
    "preprocess": ("knnlm.data.preprocess", "PreprocessConfig",
                   "tokenize text (byte-level BPE or fairseq dict) into a data-bin"),
    "train": ("knnlm.lm.train", "TrainConfig", "train a Transformer LM (torchrun for DDP)"),
    "eval-lm": ("knnlm.evaluate", "EvalConfig", "evaluate perplexity with fairseq eval-lm blocking"),
    "build-dstore": ("knnlm.build_dstore", "BuildDstoreConfig",
                     "save kNN-LM keys (att/ffn/layer:N) and values of a split"),
    "build-index": ("knnlm.knn.index", "BuildIndexConfig", "build a FAISS index over datastore keys"),
    "prune-dstore": ("knnlm.knn.prune", "PruneConfig",
                     "a smaller weighted datastore: greedy merging, random or k-means pruning"),
    "reduce-dstore": ("knnlm.knn.reduce", "ReduceConfig",
                      "a datastore of PCA-reduced keys (queries are projected at search time)"),
    "cluster-dstore": ("knnlm.knn.clusters", "ClusterConfig",
                       "k-means clusters of the keys, for RetoMaton's wider pointers"),
    "plan": ("knnlm.knn.plan", "PlanConfig",
             "disk, RAM and time a datastore and its index will need, before building"),
    "centroids": ("knnlm.knn.centroids", "CentroidsConfig",
                  "k-means or per-token centroids of datastore keys, as an output layer"),
    "sweep": ("knnlm.knn.sweep", "SweepConfig", "λ / temperature / k / score-mode sweeps over a retrieval cache"),
    "train-gate": ("knnlm.train_gate", "TrainGateConfig",
                   "adaptive retrieval: train the gate that picks the tokens to search"),
    "tune": ("knnlm.tune", "TuneConfig",
             "best λ, T, k and score mode on a held-out split, used by every kNN command"),
    "analyze": ("knnlm.analysis.analyze", "AnalyzeConfig",
                "the paper's analyses: representation, retrieval, temperature, size, heads"),
    "allot-embeddings": ("knnlm.lm.heads_train", "AllotConfig",
                         "extra output embeddings per token by log-frequency (for train)"),
    "loss-weights": ("knnlm.lm.loss_weights", "LossWeightsConfig",
                     "per-token loss weights from where kNN beats the LM (train --weighted-loss)"),
    "generate": ("knnlm.generate", "GenerateConfig", "continue prompts with the LM or the kNN-LM"),
    "neighbors": ("knnlm.neighbors", "NeighborsConfig",
                  "show the retrieved neighbours of each position of a text, as text"),
    "explore": ("knnlm.explore.server", "ExploreConfig",
                "a local web server: the explorer page for any text typed in"),
    "lm-eval": ("knnlm.lm_eval_run", "LmEvalConfig",
                "lm-evaluation-harness tasks with the LM and the kNN-LM side by side"),
    "demo": ("knnlm.demo", "DemoConfig", "run the whole pipeline on the Shakespeare corpus"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: knnlm <command> [options]   (knnlm <command> --help for its flags)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def quiet_libraries() -> None:
    """``--quiet``: the libraries' own progress bars and advice (HF hub downloads,
    transformers' weight loading) are silenced too, in this process and its children."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "transformers" in sys.modules:        # imported already: its switches read the
        tf_logging = sys.modules["transformers"].utils.logging     # environment once
        tf_logging.disable_progress_bar()
        tf_logging.set_verbosity_error()


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"knnlm: error: unknown command {name!r} (try: {', '.join(COMMANDS)})\n")
        return 2
    module_name, cls_name, desc = COMMANDS[name]
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        # a torchrun rank: c10d's C++ warnings (a store connection reset when another rank
        # stops, with stack frames) would bury the one line each rank prints
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    module = importlib.import_module(module_name)
    # the libraries' warnings (numpy, torch, FAISS's Python side) are held: a refused run
    # says one line, its error; a finished one says each distinct warning in one line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        rc = _run(name, module, cls_name, desc, rest)
    if rc == 0:
        for text in dict.fromkeys(f"{w.category.__name__}: {str(w.message).strip()}"
                                  for w in caught):
            sys.stderr.write(f"knnlm {name}: warning: {text.splitlines()[0][:300]}\n")
    return rc


def _run(name: str, module, cls_name: str, desc: str, rest: list[str]) -> int:
    try:
        cfg = parse_config(getattr(module, cls_name), rest, prog=f"knnlm {name}",
                           description=(module.__doc__ or desc).strip())
        if getattr(cfg, "quiet", False):
            quiet_libraries()
        module.main(cfg)
    except UserError as exc:
        sys.stderr.write(f"knnlm {name}: error: {exc}\n")
        return 2
    except OSError as exc:   # disk full, read-only, name too long, ...: one line, the path
        sys.stderr.write(f"knnlm {name}: error: {describe_os_error(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"knnlm {name}: interrupted\n")
        return 130
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
