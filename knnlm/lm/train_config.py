"""The `knnlm train` configuration: fairseq's training flags and the original fork's
output-head flags, validated (see :mod:`knnlm.lm.train` for the loop)."""
from __future__ import annotations

from dataclasses import dataclass

from ..data.blocks import BREAK_MODES
from ..guard import check_output
from ..util import FairseqTaskFlags, UserError, flag
from .optim import OPTIMIZERS, SCHEDULERS, parse_betas
from .transformer import ARCHS


@dataclass
class TrainConfig(FairseqTaskFlags):
    data: str = flag(help="data-bin directory", positional=True)
    arch: str = flag("small", "model preset", choices=tuple(ARCHS))
    save_dir: str = flag("checkpoints", "where checkpoints and logs go")
    tokens_per_sample: int = flag(512, "tokens per training sample")
    sample_break_mode: str = flag("none", "none | complete | eos", choices=BREAK_MODES)
    max_tokens: int = flag(4096, "tokens per batch (per process)")
    batch_size: int | None = flag(None, "samples per batch (default: from --max-tokens)",
                                  aliases=("--max-sentences",))
    update_freq: int = flag(1, "batches accumulated per update")
    # fairseq's defaults wherever fairseq has the flag
    optimizer: str = flag("nag", "nag | adam (fairseq's default: nag)", choices=OPTIMIZERS)
    lr: float = flag(0.25, "learning rate (the peak of fixed, inverse_sqrt and "
                     "reduce_lr_on_plateau; the floor of cosine, as in fairseq)")
    max_lr: float | None = flag(None, "cosine: the peak learning rate (> --lr)")
    adam_betas: str = flag("(0.9, 0.999)", "Adam betas")
    adam_eps: float = flag(1e-8, "Adam epsilon")
    momentum: float = flag(0.99, "NAG momentum")
    weight_decay: float = flag(0.0, "weight decay")
    clip_norm: float = flag(25.0, "clip gradients to this global norm (0: off)")
    lr_scheduler: str = flag("fixed", "fixed | inverse_sqrt | cosine | reduce_lr_on_plateau",
                             choices=SCHEDULERS)
    warmup_updates: int = flag(0, "linear warm-up updates")
    warmup_init_lr: float = flag(-1.0, "learning rate at the start of warm-up (-1: 0, or "
                                 "--lr for cosine)")
    min_lr: float = flag(-1.0, "stop training once the learning rate falls to this value")
    lr_period_updates: int = flag(-1, "cosine: updates of the first period (default: "
                                  "max-update minus warm-up)")
    t_mult: float = flag(1.0, "cosine: each period is this many times longer than the last")
    lr_shrink: float = flag(0.1, "cosine: floor and peak are scaled by this at each restart; "
                            "reduce_lr_on_plateau: the learning rate, after a bad epoch")
    lr_threshold: float = flag(1e-4, "reduce_lr_on_plateau: relative improvement of the "
                               "validation loss that counts")
    lr_patience: int = flag(0, "reduce_lr_on_plateau: bad epochs tolerated before shrinking")
    max_update: int = flag(0, "stop after this many updates (0: no limit)")
    max_epoch: int = flag(0, "stop after this many epochs (0: no limit)")
    stop_time_hours: float = flag(0.0, "stop after this much wall time (0: no limit)")
    seed: int = flag(1, "random seed")
    share_decoder_input_output_embed: bool = flag(False, "tie input and output embeddings")
    dropout: float | None = flag(None, "override the preset's dropout")
    attention_dropout: float | None = flag(None, "override the preset's attention dropout")
    activation_dropout: float | None = flag(None, "override the preset's activation dropout")
    decoder_layers: int | None = flag(None, "override the preset's layer count")
    decoder_embed_dim: int | None = flag(None, "override the preset's model dimension")
    decoder_ffn_embed_dim: int | None = flag(None, "override the preset's FFN dimension")
    decoder_attention_heads: int | None = flag(None, "override the preset's head count")
    valid_subset: str = flag("valid", "split used for validation")
    validate_interval: int = flag(1, "validate every N epochs (0: never at epoch ends)")
    validate_interval_updates: int = flag(0, "also validate every N updates (0: off)")
    save_interval_updates: int = flag(0, "also save checkpoint_last.pt every N updates")
    save_interval: int = flag(0, "also keep checkpoint<EPOCH>.pt at the end of every N-th "
                              "epoch (fairseq's epoch checkpoints; 0: none)")
    max_valid_tokens: int = flag(0, "validate on the first N tokens only (0: all)")
    # parametric heads (paper notes §3.3, §3.8; names of the original fork)
    restore_file: str | None = flag(None, "start from this checkpoint's weights (fresh "
                                    "optimizer); the base model of the flags below")
    softmax_input: str = flag("ffn", "representation the output layer reads",
                              choices=("ffn", "att"))
    use_last_ffn_input: bool = flag(False, "same as --softmax-input att")
    pseudo_vocab_ratio: int = flag(1, "K output embeddings per token (summed softmax mass)")
    num_extra_embed_file: str | None = flag(None, "JSON list: extra embeddings per token "
                                            "(knnlm allot-embeddings)")
    k_mos: int = flag(1, "mixture of K softmaxes")
    additional_linear: bool = flag(False, "add the logits of a second V x D head on att")
    use_l2: bool = flag(False, "logits = -||h - w||^2 instead of h.w")
    norm_l2: bool = flag(False, "L2-normalise the output layer's input")
    interpolated_loss: bool = flag(False, "loss = -log((1-λ) p_base + λ p_new), p_base from "
                                   "the frozen --restore-file model")
    train_lambda: float = flag(0.25, "--interpolated-loss: weight λ of the new model")
    weighted_loss: str | None = flag(None, "weight each target's loss by 1 + its entry in this "
                                     "JSON list (knnlm loss-weights: the share of the token's "
                                     "training occurrences where kNN beat the LM)")
    init_out_embed: bool = flag(False, "re-initialise the output rows at random, N(0, 1/D) "
                                "(the original's flag)")
    copy_out_embed: bool = flag(False, "initialise every output row from its token's base row "
                                "(extra rows with a little noise)")
    preserve_out_embed: bool = flag(False, "more rows than tokens: each token's first row "
                                    "starts as its base row (the original's flag)")
    finetune_out_embed: bool = flag(False, "train only the output layer (body frozen)")
    finetune_mos: bool = flag(False, "train only the mixture-of-softmaxes head")
    finetune_additional_linear: bool = flag(False, "train only the additional linear head")
    finetune_centroids: bool = flag(False, "the fork's first name of --finetune-out-embed "
                                    "(with --load-centroids: train only the centroid rows)")
    load_centroids: str | None = flag(None, "--restore-file: the output layer becomes a "
                                      "softmax over these centroids (knnlm centroids: "
                                      "centroids.npy), read by the keytype they were made of")
    load_centroid_distribution: str | None = flag(
        None, "P(w | centroid) of the centroid head (centroid_dist.npz); without "
        "--load-centroids it replaces the distribution of a --restore-file model that has one")
    # fairseq flags of the fork's command lines (what they ask for is what happens here)
    criterion: str = flag("cross_entropy", "fairseq's criterion: cross_entropy, or the fork's "
                          "agg_softmax (a token's rows' summed softmax mass): the loss every "
                          "head has here; adaptive_loss is not implemented")
    knn_keytype: str | None = flag(None, "the fork's model argument (which features its model "
                                   "returned): accepted; --softmax-input chooses the input of "
                                   "the output layer")
    reset_optimizer: bool = flag(False, "--restore-file: fresh optimizer (always, here)")
    reset_dataloader: bool = flag(False, "--restore-file: data from the start (always, here)")
    reset_meters: bool = flag(False, "--restore-file: fresh meters (always, here)")
    reset_lr_scheduler: bool = flag(False, "--restore-file: fresh schedule (always, here)")
    ddp_backend: str | None = flag(None, "fairseq's DDP implementation (c10d, no_c10d): "
                                   "accepted; knnlm's multi-process training is PyTorch DDP")
    skip_invalid_size_inputs_valid_test: bool = flag(
        False, "accepted: no training or validation sample here exceeds --tokens-per-sample")
    no_epoch_checkpoints: bool = flag(False, "keep no checkpoint<EPOCH>.pt (the default here; "
                                      "--save-interval keeps them)")
    fp16: bool = flag(False, "mixed precision fp16 with loss scaling (GPU)")
    bf16: bool = flag(False, "mixed precision bf16 (GPU)")
    cpu: bool = flag(False, "train on the CPU even if a GPU is present")
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        for name in ("tokens_per_sample", "max_tokens", "update_freq"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if self.batch_size is not None and self.batch_size <= 0:
            raise UserError("--batch-size must be > 0")
        if self.lr_scheduler == "cosine":
            if self.max_lr is None:
                raise UserError("--lr-scheduler cosine needs --max-lr: as in fairseq, --max-lr "
                                "is the peak and --lr the floor of the cosine")
            if not 0 <= self.lr < self.max_lr:
                raise UserError(f"--lr-scheduler cosine: --lr (the floor, {self.lr}) must be "
                                f">= 0 and below --max-lr ({self.max_lr})")
            if self.t_mult <= 0 or not 0 < self.lr_shrink <= 1:
                raise UserError("--t-mult must be > 0 and --lr-shrink in (0, 1]")
        elif self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if self.criterion not in ("cross_entropy", "agg_softmax"):
            raise UserError(f"--criterion {self.criterion}: cross_entropy and agg_softmax are "
                            "implemented (adaptive_loss and the adaptive softmax are not)")
        if self.knn_keytype is not None and self.knn_keytype not in (
                "att", "ffn", "last_ffn_input", "last_linear_input"):
            raise UserError(f"--knn-keytype {self.knn_keytype}: att (last_ffn_input) or ffn "
                            "(last_linear_input)")
        if self.no_epoch_checkpoints and self.save_interval:
            raise UserError("--no-epoch-checkpoints and --save-interval are exclusive")
        parse_betas(self.adam_betas)             # checked whatever the optimizer
        if self.optimizer != "adam" and (self.adam_betas != "(0.9, 0.999)"
                                         or self.adam_eps != 1e-8):
            raise UserError("--adam-betas and --adam-eps act with --optimizer adam")
        if self.optimizer != "nag" and self.momentum != 0.99:
            raise UserError("--momentum acts with --optimizer nag")
        if self.lr_scheduler == "reduce_lr_on_plateau" and not (
                0 < self.lr_shrink < 1 and self.lr_threshold >= 0 and self.lr_patience >= 0):
            raise UserError("reduce_lr_on_plateau needs --lr-shrink in (0, 1), --lr-threshold "
                            ">= 0 and --lr-patience >= 0")
        for name in ("weight_decay", "clip_norm", "max_update", "max_epoch", "stop_time_hours",
                     "warmup_updates", "validate_interval_updates", "save_interval_updates",
                     "save_interval", "max_valid_tokens", "validate_interval"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        if self.lr_scheduler == "cosine" and self.max_update <= 0 and self.lr_period_updates <= 0:
            raise UserError("--lr-scheduler cosine needs --max-update or --lr-period-updates")
        if self.max_update == 0 and self.max_epoch == 0 and self.stop_time_hours == 0:
            raise UserError("give a stopping point: --max-update, --max-epoch or --stop-time-hours")
        if self.fp16 and self.bf16:
            raise UserError("--fp16 and --bf16 are exclusive")
        for name in ("decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim",
                     "decoder_attention_heads"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, got {v}")
        if None not in (self.decoder_embed_dim, self.decoder_attention_heads) and \
                self.decoder_embed_dim % self.decoder_attention_heads:
            raise UserError(f"--decoder-embed-dim {self.decoder_embed_dim} is not a multiple of "
                            f"--decoder-attention-heads {self.decoder_attention_heads}")
        check_output(self.save_dir, "dir", "--save-dir")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        if self.use_last_ffn_input:
            self.softmax_input = "att"
        if self.finetune_centroids:
            self.finetune_out_embed = True
        if self.load_centroids or self.load_centroid_distribution:
            if not self.restore_file:
                raise UserError("--load-centroids and --load-centroid-distribution need "
                                "--restore-file (the model whose output layer they replace)")
            if self.pseudo_vocab_ratio > 1 or self.num_extra_embed_file or self.k_mos > 1 or \
                    self.additional_linear:
                raise UserError("a centroid head takes none of --pseudo-vocab-ratio, "
                                "--num-extra-embed-file, --k-mos, --additional-linear")
        if self.pseudo_vocab_ratio < 1 or self.k_mos < 1:
            raise UserError("--pseudo-vocab-ratio and --k-mos must be >= 1")
        if self.num_extra_embed_file and self.pseudo_vocab_ratio > 1:
            raise UserError("--pseudo-vocab-ratio and --num-extra-embed-file are exclusive")
        if not 0 < self.train_lambda <= 1:
            raise UserError(f"--train-lambda must be in (0, 1], got {self.train_lambda}")
        inits = [n for n in ("init_out_embed", "copy_out_embed", "preserve_out_embed")
                 if getattr(self, n)]
        if len(inits) > 1:
            raise UserError(f"--{inits[0].replace('_', '-')} and --{inits[1].replace('_', '-')} "
                            "are exclusive")
        needs_base = [n for n in ("interpolated_loss", *inits, *self.finetune_flags())
                      if getattr(self, n)]
        if needs_base and not self.restore_file:
            raise UserError(f"--{needs_base[0].replace('_', '-')} needs --restore-file "
                            "(the trained base model)")

    @staticmethod
    def finetune_flags() -> tuple[str, ...]:
        return ("finetune_out_embed", "finetune_mos", "finetune_additional_linear")

    def head_config(self, vocab) -> dict:
        """The ModelConfig head fields these flags ask for (``vocab``: the data-bin's)."""
        from .heads_train import read_extra_embed_file
        extra = (read_extra_embed_file(self.num_extra_embed_file, len(vocab))
                 if self.num_extra_embed_file else None)
        return dict(softmax_input=self.softmax_input, pseudo_vocab_ratio=self.pseudo_vocab_ratio,
                    num_extra_embed=extra, k_mos=self.k_mos,
                    additional_linear=self.additional_linear, use_l2=self.use_l2,
                    norm_l2=self.norm_l2, num_special_tokens=vocab.num_specials, head_version=2)

    def model_overrides(self) -> dict:
        keys = ("dropout", "attention_dropout", "activation_dropout", "decoder_layers",
                "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads")
        out = {k: getattr(self, k) for k in keys}
        out["share_decoder_input_output_embed"] = self.share_decoder_input_output_embed or None
        out["max_target_positions"] = max(self.tokens_per_sample,
                                          ARCHS[self.arch].get("max_target_positions", 1024))
        return out
