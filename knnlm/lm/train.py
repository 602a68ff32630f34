"""`knnlm train`: train a Transformer LM on a data-bin, fairseq-style.

Inputs: a data-bin directory (positional). Outputs in ``--save-dir``:
``checkpoint_last.pt`` / ``checkpoint_best.pt`` (written atomically), ``train_config.json``
and ``train_log.jsonl`` (one JSON record per validation).

    knnlm train runs/demo/data-bin --arch small --tokens-per-sample 256 --max-tokens 4096 \\
        --optimizer adam --lr 1e-5 --max-lr 1e-3 --lr-scheduler cosine --warmup-updates 100 \\
        --max-update 2000 --save-dir runs/demo/ckpt
    torchrun --nproc_per_node 8 -m knnlm train ...      # DDP, one process per GPU

Exact resume: rerunning the same command after a kill continues from checkpoint_last.pt
and reaches the same parameters as an uninterrupted run. The data order of an epoch is a
seeded permutation and the dropout RNG is reseeded from (seed, rank, update) before every
update, so the checkpoint needs no RNG state.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.blocks import score_windows, shifted_inputs, train_blocks
from ..data.preprocess import DataBin
from ..distributed import DistContext, setup_distributed
from ..guard import output_lock
from ..io import write_json_atomic
from ..knn import math as knn_math
from ..util import UserError, config_dict
from .checkpoint import CKPT_FORMAT, CKPT_VERSION, load_checkpoint, save_checkpoint
from .device import autocast_context
from .optim import Plateau, build_optimizer, lr_at
from .progress import TrainProgress
from .scoring import iter_scored
from .train_config import TrainConfig  # noqa: F401  (the command's config: knnlm.lm.train.TrainConfig)
from .transformer import build_model, count_parameters

SEED_MIX = 1_000_003


def epoch_batches(blocks: np.ndarray, epoch: int, seed: int, max_tokens: int,
                  batch_size: int | None, tokens_per_sample: int) -> list[np.ndarray]:
    """The epoch's batches (arrays of block indices): a seeded shuffle, then fixed-size
    groups of ``batch_size`` (default ``max_tokens // tokens_per_sample``) blocks."""
    order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
    bsz = batch_size or max(1, max_tokens // tokens_per_sample)
    return [order[i:i + bsz] for i in range(0, len(order), bsz)]


def make_batch(tokens: np.ndarray, blocks: np.ndarray, idx: np.ndarray, eos: int, pad: int):
    """(inputs, targets) LongTensors (B, L), right-padded; padded targets are ``pad``."""
    spans = blocks[idx]
    L = int((spans[:, 1] - spans[:, 0]).max())
    inp = np.full((len(idx), L), pad, dtype=np.int64)
    tgt = np.full((len(idx), L), pad, dtype=np.int64)
    for b, (s, e) in enumerate(spans.tolist()):
        inp[b, :e - s] = shifted_inputs(tokens, eos, s, e)
        tgt[b, :e - s] = tokens[s:e]
    return torch.from_numpy(inp), torch.from_numpy(tgt)


def token_logprobs(model, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """(B, L) log p(target) under ``model``."""
    feats, _ = model(inp)
    logits = model.output_layer(feats).float()
    return torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]


class LossModule(torch.nn.Module):
    """The LM and its loss in one ``forward``, so DDP sees every parameter used there.

    With a ``base`` model and ``train_lambda`` λ, the loss is the interpolated loss
    −log((1−λ)·p_base + λ·p_model), p_base from the frozen base."""

    def __init__(self, model, pad: int, base=None, train_lambda: float = 1.0,
                 weights: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.pad = pad
        self.train_lambda = train_lambda
        self.register_buffer("weights", weights, persistent=False)   # (V,) per-target
        # kept out of the module tree: DDP must not sync it and train() must not touch it
        self._base = [base] if base is not None else []

    def forward(self, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Summed token NLL (nats) over non-pad targets."""
        keep = tgt != self.pad
        if not self._base:
            feats, _ = self.model(inp)
            logits = self.model.output_layer(feats).float()
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)),
                                                     tgt.view(-1), weight=self.weights,
                                                     ignore_index=self.pad, reduction="sum")
        with torch.no_grad():
            base_lp = token_logprobs(self._base[0], inp, tgt)
        mix = knn_math.interpolate(base_lp, token_logprobs(self.model, inp, tgt), self.train_lambda)
        if self.weights is not None:
            mix = mix * self.weights[tgt]
        return -mix[keep].sum()


@torch.no_grad()
def validate(model, databin: DataBin, subset: str, tokens_per_sample: int, max_tokens: int,
             max_valid_tokens: int, device, dist: DistContext, amp_dtype=None) -> float:
    """Mean NLL per token (nats) on ``subset``; the windows are split across ranks."""
    tokens = databin.split(subset)
    n = len(tokens) if not max_valid_tokens else min(len(tokens), max_valid_tokens)
    windows = score_windows(len(tokens), tokens_per_sample, 0, end=n)
    per_rank = math.ceil(len(windows) / dist.world_size)  # a contiguous share per rank
    windows = windows[dist.rank * per_rank:(dist.rank + 1) * per_rank]
    nll, count = 0.0, 0
    for sb in iter_scored(model, tokens, windows, eos=databin.eos, pad=databin.pad,
                          max_tokens=max_tokens, softmax_batch=4096, device=device,
                          amp_dtype=amp_dtype):
        nll -= float(sb.logprobs.double().sum())
        count += len(sb.targets)
    nll, count = dist.all_reduce_sum([nll, count])
    return nll / max(1, count)


class Trainer:
    """One visible loop: batches -> update -> maybe validate / save."""

    def __init__(self, cfg: TrainConfig, on_update: Callable[[int], None] | None = None):
        self.cfg = cfg
        self.on_update = on_update
        self._interrupted = False       # set by the first Ctrl-C (see main)
        self.dist = setup_distributed(cfg.cpu)
        self.device = self.dist.device
        if (cfg.fp16 or cfg.bf16) and self.device.type != "cuda":
            raise UserError("--fp16/--bf16 need a GPU; drop the flag to train in fp32 on CPU")
        self.amp = torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else None
        self.databin = DataBin(cfg.data)
        self.tokens = self.databin.split("train")
        if len(self.tokens) < 2:
            raise UserError(f"the train split of {cfg.data} is empty: nothing to train on")
        if not len(self.databin.split(cfg.valid_subset)):  # fail early when missing or empty
            raise UserError(f"the {cfg.valid_subset} split of {cfg.data} is empty: nothing to "
                            "validate on")
        self.blocks = train_blocks(self.tokens, self.databin.eos, cfg.tokens_per_sample,
                                   cfg.sample_break_mode)
        self.save_dir = Path(cfg.save_dir)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model, base = self._build_model()
        self.optimizer = build_optimizer(cfg.optimizer, [p for p in self.model.parameters()
                                                         if p.requires_grad], lr=cfg.lr,
                                         weight_decay=cfg.weight_decay, adam_betas=cfg.adam_betas,
                                         adam_eps=cfg.adam_eps, momentum=cfg.momentum)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.fp16)
        self.state = dict(epoch=1, update_in_epoch=0, num_updates=0, best_loss=None,
                          last_valid_loss=None, last_valid_update=-1, train_seconds=0.0,
                          tokens_seen=0)
        self._resume()
        weights = None
        if cfg.weighted_loss:    # the original's class weights: 1 + the kNN-helped share
            from .loss_weights import read_loss_weights
            weights = 1.0 + read_loss_weights(cfg.weighted_loss, self.databin.vocab_size)
        self.loss_module = self.dist.wrap(LossModule(
            self.model, self.databin.pad, base if cfg.interpolated_loss else None,
            cfg.train_lambda, weights.to(self.device) if weights is not None else None))

    def _build_model(self):
        """(model, frozen base model or None): a fresh ``--arch`` model, or with
        ``--restore-file`` the base's body under the head the flags ask for."""
        c, V = self.cfg, self.databin.vocab_size
        head = c.head_config(self.databin.vocab)
        overrides = {k: v for k, v in c.model_overrides().items() if v is not None}
        if not c.restore_file:
            try:
                return build_model(c.arch, V, self.databin.pad, **overrides, **head).to(self.device), None
            except ValueError as exc:
                raise UserError(str(exc))
        from .heads_train import (centroid_head, freeze_for_finetune, load_base,
                                  model_from_base)
        base_ckpt, base = load_base(c.restore_file, self.databin, self.device)
        overrides.pop("max_target_positions", None)
        model = model_from_base(base_ckpt, head, c.seed, overrides, init_out_embed=c.init_out_embed,
                                copy_out_embed=c.copy_out_embed,
                                preserve_out_embed=c.preserve_out_embed,
                                centroids=centroid_head(c, base_ckpt, V))
        groups = [n[len("finetune_"):] for n in c.finetune_flags() if getattr(c, n)]
        if groups:
            freeze_for_finetune(model, groups)
        return model.to(self.device), base

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> dict:
        return dict(format=CKPT_FORMAT, version=CKPT_VERSION, model_cfg=self.model.cfg.to_dict(),
                    model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(), train_state=dict(self.state),
                    train_config=config_dict(self.cfg),
                    data=dict(tokenizer_sha256=self.databin.tokenizer_sha256,
                              vocab_size=self.databin.vocab_size, data_dir=str(self.databin.path)))

    def _resume(self) -> None:
        last = self.save_dir / "checkpoint_last.pt"
        if not last.exists():
            return
        ckpt = load_checkpoint(last, map_location=self.device)
        if ckpt["model_cfg"] != self.model.cfg.to_dict():
            raise UserError(f"{last} holds a model with another configuration; "
                            "use a fresh --save-dir")
        if ckpt["data"]["tokenizer_sha256"] != self.databin.tokenizer_sha256:
            raise UserError(f"{last} was trained on data with another vocabulary")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state.update(ckpt["train_state"])
        if self.dist.is_main:
            print(f"resuming from {last} at update {self.state['num_updates']} "
                  f"(epoch {self.state['epoch']})")

    def _tick(self) -> None:
        """Add the wall time since the last tick to ``train_seconds`` (kept in every
        checkpoint, so a killed run resumes with its time and --stop-time-hours holds)."""
        now = time.perf_counter()
        self.state["train_seconds"] += now - getattr(self, "_clock", now)
        self._clock = now

    def save(self, best: bool = False, epoch: int | None = None) -> None:
        """checkpoint_last.pt (and _best.pt); with ``epoch``, checkpoint<epoch>.pt first, so
        a run killed between the two redoes the epoch's end and writes it again."""
        self._tick()
        if not self.dist.is_main:
            return
        ckpt = self._checkpoint()
        if epoch is not None:
            save_checkpoint(ckpt, self.save_dir / f"checkpoint{epoch}.pt")
        save_checkpoint(ckpt, self.save_dir / "checkpoint_last.pt")
        if best:
            save_checkpoint(ckpt, self.save_dir / "checkpoint_best.pt")

    # ------------------------------------------------------------------ steps
    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step`` (fairseq's schedules, :mod:`.optim`)."""
        c = self.cfg
        return lr_at(step, scheduler=c.lr_scheduler, lr=c.lr, warmup_updates=c.warmup_updates,
                     warmup_init_lr=c.warmup_init_lr, max_update=c.max_update,
                     lr_period_updates=c.lr_period_updates, max_lr=c.max_lr, t_mult=c.t_mult,
                     lr_shrink=c.lr_shrink, plateau_scale=self.state.get("plateau_scale", 1.0))

    def _done(self, t_start: float) -> bool:
        c, s = self.cfg, self.state
        if c.max_update and s["num_updates"] >= c.max_update:
            return True
        if c.max_epoch and s["epoch"] > c.max_epoch:
            return True
        # fairseq's --min-lr: stop once the schedule (past its warm-up) reaches it
        if s["num_updates"] >= c.warmup_updates and self.lr_at(s["num_updates"]) <= c.min_lr:
            return True
        elapsed = s["train_seconds"] + time.perf_counter() - getattr(self, "_clock", t_start)
        return bool(c.stop_time_hours and elapsed >= c.stop_time_hours * 3600)

    def train_step(self, batches: list[np.ndarray]) -> tuple[float, int]:
        """One update over this rank's micro-batches; returns (summed NLL, tokens), global."""
        c, d = self.cfg, self.dist
        seed = ((c.seed * SEED_MIX + d.rank) * SEED_MIX + self.state["num_updates"]) % (2 ** 63)
        torch.manual_seed(seed)
        lr = self.lr_at(self.state["num_updates"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.loss_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        # A rank short of batches at the end of an epoch runs a zero-weight dummy batch so
        # that every rank takes part in each gradient all-reduce.
        work = [(b, 1.0) for b in batches] or [(self._dummy, 0.0)]
        nll, ntok = 0.0, 0
        for i, (idx, weight) in enumerate(work):
            inp, tgt = make_batch(self.tokens, self.blocks, idx, self.databin.eos, self.databin.pad)
            with d.no_sync(self.loss_module, last=i == len(work) - 1):
                with autocast_context(self.device, self.amp):
                    loss = self.loss_module(inp.to(self.device), tgt.to(self.device))
                n = int((tgt != self.databin.pad).sum())
                self.scaler.scale(loss * weight).backward()
            nll += float(loss.detach()) * weight
            ntok += int(n * weight)
        nll, ntok = d.all_reduce_sum([nll, ntok])
        # DDP averaged the gradients over ranks; turn the sum into a per-token mean.
        self.scaler.unscale_(self.optimizer)
        scale = d.world_size / max(1, ntok)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        if c.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state["num_updates"] += 1
        self.state["tokens_seen"] += ntok
        return nll, ntok

    def validate(self, epoch: int | None = None, epoch_end: bool = False) -> float:
        c = self.cfg
        loss = validate(self.model, self.databin, c.valid_subset, c.tokens_per_sample,
                        c.max_tokens, c.max_valid_tokens, self.device, self.dist, self.amp)
        if epoch_end and c.lr_scheduler == "reduce_lr_on_plateau" and \
                self.state["num_updates"] > c.warmup_updates:
            # fairseq steps it with each epoch's validation loss, once warm-up is over
            Plateau(self.state, c.lr_shrink, c.lr_threshold, c.lr_patience).step(loss)
        best = self.state["best_loss"]
        is_best = best is None or loss < best
        if is_best:
            self.state["best_loss"] = loss
        self.state["last_valid_loss"] = loss
        self.state["last_valid_update"] = self.state["num_updates"]
        record = dict(num_updates=self.state["num_updates"], epoch=self.state["epoch"],
                      valid_loss=loss / math.log(2), valid_ppl=math.exp(loss),
                      best=is_best, tokens_seen=self.state["tokens_seen"])
        if self.dist.is_main:
            with open(self.save_dir / "train_log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        self.save(best=is_best, epoch=epoch)
        return loss

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        c, s, d = self.cfg, self.state, self.dist
        if d.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.save_dir / "train_config.json", config_dict(c))
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            print(f"model {c.restore_file or c.arch}: {count_parameters(self.model):,} "
                  f"parameters ({trainable:,} trained) | "
                  f"{len(self.blocks):,} training blocks | {d.world_size} process(es) on "
                  f"{self.device.type}")
        group = d.world_size * c.update_freq
        t_start = self._clock = time.perf_counter()
        if self._done(t_start) and s["last_valid_loss"] is not None:
            if d.is_main:
                print(f"{self.save_dir}: already trained ({s['num_updates']} updates)")
            return self._summary()
        progress = TrainProgress(self, disable=c.quiet or not d.is_main)
        while not self._done(t_start):
            batches = epoch_batches(self.blocks, s["epoch"], c.seed, c.max_tokens, c.batch_size,
                                    c.tokens_per_sample)
            self._dummy = batches[0]
            n_updates = math.ceil(len(batches) / group)
            while s["update_in_epoch"] < n_updates and not self._done(t_start):
                u = s["update_in_epoch"]
                mine = batches[u * group:(u + 1) * group][d.rank::d.world_size]
                nll, ntok = self.train_step(mine)
                s["update_in_epoch"] += 1
                progress.update(nll, ntok)
                if c.validate_interval_updates and s["num_updates"] % c.validate_interval_updates == 0:
                    progress.valid(self.validate())
                elif c.save_interval_updates and s["num_updates"] % c.save_interval_updates == 0:
                    self.save()
                if self.on_update is not None:
                    self.on_update(s["num_updates"])
                if self._interrupted:     # Ctrl-C: keep the last whole update, then stop
                    self.save()
                    raise KeyboardInterrupt
            if s["update_in_epoch"] >= n_updates:  # epoch finished
                s["epoch"] += 1
                s["update_in_epoch"] = 0
                done = s["epoch"] - 1
                keep = done if c.save_interval and done % c.save_interval == 0 else None
                if c.validate_interval and done % c.validate_interval == 0:
                    progress.valid(self.validate(epoch=keep, epoch_end=True))
                else:
                    self.save(epoch=keep)
        self._tick()
        if s["last_valid_update"] != s["num_updates"]:
            self.validate()
        else:
            self.save()
        progress.close()
        return self._summary()

    def _summary(self) -> dict:
        s = self.state
        return dict(num_updates=s["num_updates"], valid_loss=s["last_valid_loss"] / math.log(2),
                    valid_ppl=math.exp(s["last_valid_loss"]),
                    best_valid_ppl=math.exp(s["best_loss"]), tokens_seen=s["tokens_seen"],
                    seconds=s["train_seconds"])


def _on_sigint(trainer: "Trainer"):
    """The first Ctrl-C asks the loop to save checkpoint_last after the update in flight
    and stop; a second one interrupts at once."""
    def handler(signum, frame):
        if trainer._interrupted:
            raise KeyboardInterrupt
        trainer._interrupted = True
        if trainer.dist.is_main:
            print("\ninterrupted: saving checkpoint_last after this update (Ctrl-C again to "
                  "stop at once)", file=sys.stderr)
    return handler


def main(cfg: TrainConfig, on_update: Callable[[int], None] | None = None) -> dict:
    trainer = Trainer(cfg, on_update)
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, _on_sigint(trainer)) if main_thread else None
    lock = output_lock(cfg.save_dir, "dir", "checkpoint directory") if trainer.dist.is_main \
        else contextlib.nullcontext()
    try:
        with lock:
            res = trainer.train()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old)
        trainer.dist.close()
    if trainer.dist.is_main:
        print(f"done: {res['num_updates']} updates, valid ppl {res['valid_ppl']:.2f} "
              f"(best {res['best_valid_ppl']:.2f}), {res['tokens_seen']:,} tokens in "
              f"{res['seconds']:.0f}s")
    return res
