"""Training: loss goes down, schedules, exact resume, DDP equals one process."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port
from knnlm.lm import train
from knnlm.lm.checkpoint import load_checkpoint
from knnlm.lm.optim import lr_at

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(databin, save_dir, **kw):
    base = dict(data=str(databin.path), arch="tiny", save_dir=str(save_dir),
                tokens_per_sample=32, max_tokens=128, lr=3e-3, max_update=30,
                validate_interval=0, max_valid_tokens=512, seed=3, quiet=True)
    base.update(kw)
    return train.TrainConfig(**base)


def params(path):
    return load_checkpoint(path)["model"]


def test_training_lowers_validation_loss(bpe_databin, tmp_path):
    res = train.main(tiny_cfg(bpe_databin, tmp_path, max_update=60, validate_interval_updates=20))
    log = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["valid_loss"] for r in log]
    assert losses[-1] < losses[0] - 0.5
    # random guessing over 300 tokens is log2(300) = 8.2 bits
    assert res["valid_loss"] < 7.5
    assert (tmp_path / "checkpoint_best.pt").is_file()


def test_epoch_checkpoints_hold_the_state_at_each_epochs_end(bpe_databin, tmp_path):
    # 128 blocks a batch: 7 updates an epoch, so 30 updates end epochs 1..4
    train.main(tiny_cfg(bpe_databin, tmp_path, max_tokens=4096, save_interval=2,
                        validate_interval=1))
    kept = sorted(p.name for p in tmp_path.glob("checkpoint[0-9]*.pt"))
    assert kept == ["checkpoint2.pt", "checkpoint4.pt"]
    for epoch in (2, 4):
        st = load_checkpoint(tmp_path / f"checkpoint{epoch}.pt")["train_state"]
        assert (st["epoch"], st["update_in_epoch"], st["num_updates"]) == (epoch + 1, 0, 7 * epoch)
    log = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["num_updates"] for r in log] == [7, 14, 21, 28, 30]   # each epoch's end, the last


def test_lr_schedules():
    kw = dict(lr=1.0, warmup_updates=4, warmup_init_lr=0.0)
    assert [lr_at(s, scheduler="inverse_sqrt", **kw) for s in (0, 2, 4, 16)] == [0.0, 0.5, 1.0, 0.5]
    assert lr_at(10, scheduler="fixed", lr=0.3) == 0.3
    assert lr_at(0, scheduler="fixed", lr=0.3, warmup_updates=3) == pytest.approx(0.1)


def test_cosine_is_fairseqs():
    """fairseq's cosine (SGDR): --lr the floor, --max-lr the peak; warm-up from
    --warmup-init-lr (default --lr); periods growing by --t-mult, restarts shrunk by
    --lr-shrink. Values by hand from fairseq's formula."""
    kw = dict(scheduler="cosine", lr=0.1, max_lr=1.0, warmup_updates=4, max_update=14)
    assert lr_at(0, **kw) == pytest.approx(0.1)                    # starts at the floor
    assert lr_at(2, **kw) == pytest.approx(0.55)                   # halfway up
    assert [lr_at(s, **kw) for s in (4, 9)] == pytest.approx([1.0, 0.55])
    assert lr_at(14, **kw) == pytest.approx(1.0 * 0.1)             # restart at the shrunk peak
    assert lr_at(19, **kw) == pytest.approx(0.5 * (0.1 * 0.1 + 1.0 * 0.1))
    # t_mult 2: periods of 10, 20, 40 updates after warm-up; shrink 0.75 per restart
    sg = dict(scheduler="cosine", lr=0.0001, max_lr=1.0, warmup_updates=0, lr_period_updates=10,
              t_mult=2.0, lr_shrink=0.75)
    assert lr_at(5, **sg) == pytest.approx(0.0001 + 0.5 * (1.0 - 0.0001))
    assert lr_at(10, **sg) == pytest.approx(0.75)                   # second period starts
    assert lr_at(20, **sg) == pytest.approx(0.75 * 0.0001 + 0.5 * 0.75 * (1 - 0.0001))
    assert lr_at(30, **sg) == pytest.approx(0.75 ** 2)              # third period starts
    assert lr_at(3, **dict(sg, warmup_updates=4, warmup_init_lr=1e-7)) == pytest.approx(
        1e-7 + 3 * (1.0 - 1e-7) / 4)


def test_min_lr_stops_training(bpe_databin, tmp_path):
    """fairseq's --min-lr: training stops once the schedule reaches it. Here the cosine
    runs from 0.01 to 0 over 10 updates after 2 of warm-up: 0.005 (1 + cos(pi t / 10))
    first falls to 0.001 at t = 8, i.e. before update 10."""
    res = train.main(tiny_cfg(bpe_databin, tmp_path, max_update=30, lr_scheduler="cosine", lr=0.0,
                              max_lr=0.01, warmup_updates=2, lr_period_updates=10, min_lr=0.001))
    assert res["num_updates"] == 10


class Crash(Exception):
    pass


@pytest.mark.parametrize("extra", [dict(), dict(update_freq=2, lr_scheduler="cosine",
                                                 warmup_updates=3, optimizer="nag", lr=0.0,
                                                 max_lr=0.05)])
def test_resume_after_crash_matches_uninterrupted(bpe_databin, tmp_path, extra):
    # 30 updates over ~4 epochs of the tiny corpus (crosses epoch ends), dropout on
    kw = dict(max_update=30, save_interval_updates=4, dropout=0.1, **extra)
    train.main(tiny_cfg(bpe_databin, tmp_path / "a", **kw))

    def crash_at(n):
        if n == 11:  # 3 updates after the last save at 8
            raise Crash()
    with pytest.raises(Crash):
        train.main(tiny_cfg(bpe_databin, tmp_path / "b", **kw), on_update=crash_at)
    assert load_checkpoint(tmp_path / "b" / "checkpoint_last.pt")["train_state"]["num_updates"] == 8
    train.main(tiny_cfg(bpe_databin, tmp_path / "b", **kw))
    pa, pb = params(tmp_path / "a" / "checkpoint_last.pt"), params(tmp_path / "b" / "checkpoint_last.pt")
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "knnlm", *args], env=_env(), **kw)


def _cli_args(databin, save_dir, *extra):
    return ["train", str(databin.path), "--arch", "tiny", "--save-dir", str(save_dir),
            "--tokens-per-sample", "32", "--max-tokens", "128", "--lr", "3e-3", "--seed", "3",
            "--validate-interval", "0", "--max-valid-tokens", "256", "--quiet", *extra]


def test_kill_9_and_rerun_gives_identical_parameters(bpe_databin, tmp_path):
    extra = ["--max-update", "150", "--save-interval-updates", "5"]
    done = _cli(_cli_args(bpe_databin, tmp_path / "ref", *extra), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "knnlm", *_cli_args(bpe_databin, tmp_path / "killed", *extra)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint_last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()  # SIGKILL, wherever it is
    proc.wait()
    assert load_checkpoint(ckpt)["train_state"]["num_updates"] < 150, "finished before the kill"
    again = _cli(_cli_args(bpe_databin, tmp_path / "killed", *extra), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout
    pa, pb = params(tmp_path / "ref" / "checkpoint_last.pt"), params(ckpt)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_ddp_two_processes_equal_one_process_with_update_freq_2(bpe_databin, tmp_path):
    common = ["--max-update", "6", "--dropout", "0", "--batch-size", "2", "--cpu"]
    single = _cli(_cli_args(bpe_databin, tmp_path / "one", *common, "--update-freq", "2"),
                  capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "knnlm",
                          *_cli_args(bpe_databin, tmp_path / "two", *common)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    pa, pb = params(tmp_path / "one" / "checkpoint_last.pt"), params(tmp_path / "two" / "checkpoint_last.pt")
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ctrl_c_saves_the_last_update_and_exits_130(bpe_databin, tmp_path):
    """SIGINT mid-training: checkpoint_last holds the last whole update and its wall time,
    the command exits 130, and a rerun resumes to the same weights as an uninterrupted
    run."""
    import signal
    extra = ["--max-update", "400"]
    ref = _cli(_cli_args(bpe_databin, tmp_path / "ref", *extra), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "knnlm", *_cli_args(bpe_databin, tmp_path / "int", *extra,
                                                    "--save-interval-updates", "5")],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "int" / "checkpoint_last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "saving checkpoint_last" in err and "Traceback" not in err
    state = load_checkpoint(ckpt)["train_state"]
    assert 0 < state["num_updates"] < 400 and state["train_seconds"] > 0
    again = _cli(_cli_args(bpe_databin, tmp_path / "int", *extra), capture_output=True, text=True)
    assert again.returncode == 0 and f"at update {state['num_updates']}" in again.stdout
    pa, pb = params(tmp_path / "ref" / "checkpoint_last.pt"), params(ckpt)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("patience", [0, 2])
def test_reduce_lr_on_plateau_equals_torchs_scheduler(patience):
    """fairseq's reduce_lr_on_plateau is torch's ReduceLROnPlateau (mode min, relative
    threshold), stepped with each epoch's validation loss after warm-up: the same learning
    rates over a loss curve that improves, stalls, improves by less than the threshold."""
    from knnlm.lm.optim import Plateau
    losses = [5.0, 4.0, 4.0, 3.9999, 3.5, 3.6, 3.7, 3.2, 3.2, 3.2, 3.2, 3.0]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.25)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5,
                                                     patience=patience, threshold=1e-4)
    state = {}
    plateau = Plateau(state, shrink=0.5, threshold=1e-4, patience=patience)
    for loss in losses:
        ref.step(loss)
        plateau.step(loss)
        ours = lr_at(100, scheduler="reduce_lr_on_plateau", lr=0.25, warmup_updates=10,
                     plateau_scale=state["plateau_scale"])
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert state["plateau_scale"] < 1
    # warm-up: linear from 0 (no --warmup-init-lr) to --lr, the plateau not yet applied
    assert lr_at(5, scheduler="reduce_lr_on_plateau", lr=0.25, warmup_updates=10,
                 plateau_scale=0.1) == pytest.approx(0.125)


def test_train_defaults_are_fairseqs(bpe_databin, tmp_path):
    """Where fairseq has the flag, the default is fairseq's: NAG, lr 0.25, Adam betas
    (0.9, 0.999), --clip-norm 25, the fixed schedule, --lr-shrink 0.1."""
    c = train.TrainConfig(data=str(bpe_databin.path), save_dir=str(tmp_path), max_update=1)
    assert (c.optimizer, c.lr, c.adam_betas, c.clip_norm, c.lr_scheduler, c.lr_shrink,
            c.momentum) == ("nag", 0.25, "(0.9, 0.999)", 25.0, "fixed", 0.1, 0.99)


def test_reduce_lr_on_plateau_in_training_shrinks_after_a_bad_epoch(bpe_databin, tmp_path):
    """Trained for epochs with reduce_lr_on_plateau: the state saved with the checkpoint
    records each epoch-end validation, and a resumed run keeps the shrunk rate."""
    res = train.main(tiny_cfg(bpe_databin, tmp_path / "p", lr_scheduler="reduce_lr_on_plateau",
                              optimizer="nag", lr=5.0, clip_norm=0.0, max_update=0, max_epoch=3,
                              validate_interval=1, lr_shrink=0.5, max_tokens=4096))
    state = load_checkpoint(tmp_path / "p" / "checkpoint_last.pt")["train_state"]
    log = [json.loads(x) for x in (tmp_path / "p" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["valid_loss"] * math.log(2) for r in log if r["epoch"] > 1][:3]
    want, best = 1.0, None
    for loss in losses:                     # the rule, by hand
        if best is None or loss < best * (1 - 1e-4):
            best = loss
        else:
            want *= 0.5
    assert state["plateau_scale"] == pytest.approx(want)
    assert want < 1 and res["num_updates"] > 0            # lr 5 is too high: it shrank
