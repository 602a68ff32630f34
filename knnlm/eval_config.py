"""`knnlm eval-lm`'s flags (fairseq's eval_lm and the original kNN-LM code's names), checked
as a run starts, and the fork's command lines' fairseq flags given their meaning here."""
from __future__ import annotations

import ast
from dataclasses import dataclass

from .build_dstore import BuildDstoreConfig
from .data.blocks import BREAK_MODES
from .guard import check_output
from .knn.datastore import normalize_keytype
from .knn.options import KnnOptions
from .lm.checkpoint import check_model_source
from .util import FairseqTaskFlags, UserError, flag


@dataclass
class EvalConfig(KnnOptions, FairseqTaskFlags):
    data: str = flag(help="data-bin directory", positional=True)
    path: str | None = flag(None, "checkpoint to evaluate")
    hf_model: str | None = flag(None, "instead of --path: an HF causal LM (name or directory)")
    hf_dtype: str | None = flag(None, "--hf-model: load its weights as fp32, bf16 or fp16 "
                                "(default fp32; datastores match across dtypes)",
                                choices=("fp32", "bf16", "fp16"))
    gen_subset: str = flag("test", "split to score (train, valid, test)")
    tokens_per_sample: int | None = flag(None, "longest model input, context included "
                                         "(default: the model's max positions)")
    context_window: int | None = flag(None, "tokens of extra left context before each scored "
                                      "block (default 0; HF models given no "
                                      "--tokens-per-sample: half the window)")
    max_eval_tokens: int = flag(0, "score only the first N tokens of the split (0: all)")
    sample_break_mode: str = flag("none", "blocks ignore lines (none), hold whole lines "
                                  "(complete) or one line each (eos); with --context-window, "
                                  "fairseq's LMContextWindowDataset (the papers' WikiText "
                                  "protocol: complete, --context-window 2560)",
                                  choices=BREAK_MODES)
    max_tokens: int = flag(8192, "padded tokens per batch")
    softmax_batch: int = flag(4096, "positions per output-softmax chunk (bounds memory)")
    remove_bpe: str | None = flag(None, "dictionary data: BPE continuation marker to join "
                                  "words for per-word perplexity (given alone: '@@ ', as in "
                                  "fairseq)", const="@@ ")
    bpe: str | None = flag(None, "fairseq's --bpe (subword_nmt, gpt2): accepted; --remove-bpe "
                           "joins the pieces into words")
    pseudo_vocab_ratio: int | None = flag(None, "fairseq's model argument: accepted when it is "
                                          "the checkpoint's (its head is read from it)")
    k_mos: int | None = flag(None, "fairseq's model argument: accepted when it is the "
                             "checkpoint's")
    num_extra_embed_file: str | None = flag(None, "fairseq's model argument: accepted when it "
                                            "lists the checkpoint's extra rows")
    model_overrides: str = flag("{}", "fairseq's checkpoint overrides, as the fork used them: "
                                "knn_keytype (must agree with --knn-keytype), "
                                "use_last_ffn_input (checked: the checkpoint's softmax reads "
                                "att, or with --load-centroids the centroids are att's), "
                                "use_l2 and norm_l2 (with --load-centroids), "
                                "interpolated_loss False")
    save_scores: str | None = flag(None, "write per-token target log-probs (.npy, natural log)")
    save_tokens: str | None = flag(None, "write the scored target tokens (.npy)")
    results_path: str | None = flag(None, "write the results as JSON")
    save_retrieval: str | None = flag(None, "--knnlm: write a retrieval cache to this directory "
                                      "(for `knnlm sweep`)")
    save_exact_dists: bool = flag(False, "--save-retrieval: also store exact distances")
    save_knn_scores: str | None = flag(None, "--knnlm: write per-token log p_kNN (.npy)")
    save_queries: str | None = flag(None, "--knnlm: write the query vectors (.npy, fp32)")
    save_knnlm_dstore: bool = flag(False, "instead of evaluating, save a datastore of the "
                                   "split (same as `knnlm build-dstore`)")
    dstore_mmap: str | None = flag(None, "--save-knnlm-dstore: datastore directory")
    dstore_fp32: bool = flag(False, "--save-knnlm-dstore: fp32 keys (default fp16)")
    dstore_fp16: bool = flag(False, "--save-knnlm-dstore: fp16 keys, the default (original "
                             "flag); --knnlm: accepted, the datastore records its key dtype")
    dstore_size: int | None = flag(None, "--save-knnlm-dstore: expected entries (checked); "
                                   "--knnlm: the datastore's size (checked)")
    load_centroids: str | None = flag(None, "score with centroids of datastore keys as the "
                                      "output layer (knnlm centroids: centroids.npy)")
    load_centroid_distribution: str | None = flag(None, "P(w | centroid) of --load-centroids, "
                                                  "a C x V sparse .npz (default: one token "
                                                  "per centroid, C = V); alone: replaces the "
                                                  "distribution of a checkpoint trained with "
                                                  "centroids")
    centroid_scale: float = flag(1.0, "--load-centroids: logits = scale x h.centroid")
    use_l2: bool = flag(False, "--load-centroids: logits = -scale x ||h - centroid||^2 (the "
                        "original's use_l2)")
    norm_l2: bool = flag(False, "--load-centroids: L2-normalise h first (the original's "
                         "norm_l2)")
    cpu: bool = flag(False, "run on the CPU even if a GPU is present")
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")
    fp16: bool = flag(False, "half-precision forward (GPU)")
    bf16: bool = flag(False, "bfloat16 forward (GPU)")
    overwrite: bool = flag(False, "--save-retrieval: replace a cache written by another "
                           "evaluation; --save-knnlm-dstore: a datastore of another "
                           "configuration")
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        check_model_source(self.path, self.hf_model)
        if self.tokens_per_sample is not None and self.tokens_per_sample <= 0:
            raise UserError(f"--tokens-per-sample must be > 0, got {self.tokens_per_sample}")
        if self.max_eval_tokens < 0:
            raise UserError(f"--max-eval-tokens must be >= 0, got {self.max_eval_tokens}")
        if self.context_window is not None and self.context_window < 0:
            raise UserError(f"--context-window must be >= 0, got {self.context_window}")
        if None not in (self.tokens_per_sample, self.context_window) and \
                self.context_window >= self.tokens_per_sample:
            # only fairseq's command lines say this (eval_lm ignores --tokens-per-sample and
            # takes the model's window); knnlm's --tokens-per-sample counts the context
            print(f"--context-window {self.context_window} >= --tokens-per-sample "
                  f"{self.tokens_per_sample}: the model's window is used, as fairseq's eval_lm "
                  "does (knnlm's --tokens-per-sample counts the context)")
            self.tokens_per_sample = None
        self._check_model_overrides()
        for name in ("max_tokens", "softmax_batch"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if self.fp16 and self.bf16:
            raise UserError("--fp16 and --bf16 are exclusive")
        if self.centroid_scale <= 0:
            raise UserError(f"--centroid-scale must be > 0, got {self.centroid_scale}")
        if self.dstore_fp16 and self.dstore_fp32:
            raise UserError("--dstore-fp16 and --dstore-fp32 are exclusive")
        if self.save_knnlm_dstore and not self.dstore_mmap:
            raise UserError("--save-knnlm-dstore needs --dstore-mmap DIR")
        if self.knnlm and self.save_knnlm_dstore:
            raise UserError("--knnlm and --save-knnlm-dstore are exclusive")
        if self.knnlm:
            self.check_knn()
            if self.gate and self.save_retrieval:
                raise UserError("--gate and --save-retrieval are exclusive (a cache holds every "
                                "token's neighbours; sweep the gate with knnlm train-gate)")
        for name in ("results_path", "save_scores", "save_tokens", "save_knn_scores",
                     "save_queries"):
            check_output(getattr(self, name), "file", "--" + name.replace("_", "-"))
        check_output(self.save_retrieval, "dir", "--save-retrieval")

    def _check_model_overrides(self) -> None:
        """fairseq's --model-overrides: the fork passes {'knn_keytype': ...} so that its
        model returns those features; here every keytype is returned, so the only override
        accepted is one that agrees with --knn-keytype."""
        try:
            over = ast.literal_eval(self.model_overrides)
        except (ValueError, SyntaxError):
            raise UserError(f"--model-overrides must be a Python dict literal, got "
                            f"{self.model_overrides!r}")
        if not isinstance(over, dict):
            raise UserError(f"--model-overrides must be a dict, got {self.model_overrides}")
        if over.pop("interpolated_loss", False):
            raise UserError("--model-overrides interpolated_loss True: eval-lm scores a head "
                            "alone; interpolate it with the LM by sweep --score-files")
        known = {"knn_keytype", "use_last_ffn_input", "use_l2", "norm_l2"}
        if not isinstance(over, dict) or set(over) - known:
            raise UserError("--model-overrides: only knn_keytype, use_last_ffn_input, and "
                            "with --load-centroids use_l2, norm_l2, are understood here (got "
                            f"{self.model_overrides})")
        for name in ("use_l2", "norm_l2"):       # the centroid variants: the flags of that name
            if over.get(name):
                if not self.load_centroids:
                    raise UserError(f"--model-overrides {name}: only with --load-centroids")
                setattr(self, name, True)
        # with --load-centroids: the keytype the centroids must be of; else a check that the
        # checkpoint's softmax reads att (it was trained so; the fork restated it)
        self.centroid_input = "att" if over.get("use_last_ffn_input") else None
        if "knn_keytype" in over and normalize_keytype(str(over["knn_keytype"])) != \
                normalize_keytype(self.knn_keytype.split(",")[0]):
            raise UserError(f"--model-overrides knn_keytype {over['knn_keytype']!r} disagrees "
                            f"with --knn-keytype {self.knn_keytype}")

    def to_build_dstore(self):
        """The equivalent `knnlm build-dstore` config (the original --save-knnlm-dstore)."""
        return BuildDstoreConfig(
            data=self.data, path=self.path, hf_model=self.hf_model, dstore_dir=self.dstore_mmap, gen_subset=self.gen_subset,
            knn_keytype=self.knn_keytype, tokens_per_sample=self.tokens_per_sample,
            context_window=self.context_window, max_tokens=self.max_tokens,
            dstore_fp32=self.dstore_fp32, dstore_size=self.dstore_size, cpu=self.cpu,
            sample_break_mode=self.sample_break_mode,
            max_dstore_tokens=self.max_eval_tokens,
            device=self.device, overwrite=self.overwrite, quiet=self.quiet)
