"""Help texts, and bad input: one line on stderr, exit status 2, no traceback."""
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from knnlm.cli import COMMANDS, run

from conftest import tiny_model, write_model_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_commands(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_subcommand_help_lists_every_flag(name, capsys):
    module, cls_name, _ = COMMANDS[name]
    with pytest.raises(SystemExit) as exc:
        run([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    cls = getattr(importlib.import_module(module), cls_name)
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional"):
            assert f.name.upper() in out
        else:
            assert "--" + f.name.replace("_", "-") in out, f.name


def test_original_flag_spellings_accepted():
    from knnlm.util import parse_config
    from knnlm.lm.train import TrainConfig
    cfg = parse_config(TrainConfig, ["db", "--max-sentences", "3", "--max-update", "1"], "t")
    assert cfg.batch_size == 3


def run_cli(*args):
    """The real command in a subprocess: what a user sees."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "knnlm", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def assert_user_error(res, pattern):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert pattern.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def other_databin(tmp_path_factory, corpus_dir):
    from knnlm.data import preprocess
    from knnlm.data.preprocess import DataBin
    dest = tmp_path_factory.mktemp("other")
    preprocess.main(preprocess.PreprocessConfig(destdir=str(dest), srcdir=str(corpus_dir),
                                                vocab_size=310, quiet=True))
    return DataBin(dest)


def test_bad_inputs_in_process(bpe_databin, tiny_ckpt, other_databin, tmp_path, capsys):
    """Many cases through the in-process entry point (fast); same code path as the CLI."""
    db, ck = str(bpe_databin.path), str(tiny_ckpt)
    not_ours = tmp_path / "not_ours.pt"
    torch.save({"weights": torch.zeros(3)}, not_ours)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(Path(ck).read_bytes()[:1000])
    cases = [
        (["eval-lm", str(tmp_path / "nope"), "--path", ck], "not found"),
        (["eval-lm", db, "--path", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (["eval-lm", db, "--path", str(not_ours)], "not a knnlm checkpoint"),
        (["eval-lm", db, "--path", str(truncated)], "truncated"),
        (["eval-lm", str(other_databin.path), "--path", ck], "another vocabulary"),
        (["eval-lm", db, "--path", ck, "--gen-subset", "dev"], "split 'dev'"),
        (["eval-lm", db, "--path", ck, "--tokens-per-sample", "8", "--context-window", "9999"],
         "--context-window"),
        (["eval-lm", db, "--path", ck, "--tokens-per-sample", "4096"], "max positions"),
        (["eval-lm", db, "--path", ck, "--tokens-per-sample", "abc"], "invalid int"),
        (["eval-lm", db, "--path", ck, "--device", "cuda:3"], "cuda"),
        (["train", db, "--lr", "-1", "--max-update", "3"], "--lr must be > 0"),
        (["train", db, "--arch", "gigantic", "--max-update", "3"], "invalid choice"),
        (["train", db], "stopping point"),
        (["train", db, "--max-update", "3", "--adam-betas", "0.9"], "--adam-betas"),
        (["train", db, "--max-update", "3", "--lr-scheduler", "cosine", "--max-lr", "1",
          "--max-update", "0", "--max-epoch", "1"], "cosine needs --max-update"),
        (["train", db, "--max-update", "3", "--lr-scheduler", "cosine"], "needs --max-lr"),
        (["train", db, "--max-update", "3", "--lr-scheduler", "cosine", "--lr", "2",
          "--max-lr", "1"], "below --max-lr"),
        (["preprocess", "--destdir", str(tmp_path / "x"), "--trainpref", str(tmp_path / "no.txt")],
         "no such file"),
        (["preprocess", "--destdir", str(tmp_path / "x"), "--trainpref", "a", "--vocab-size", "10"],
         "--vocab-size"),
        (["data", "fetch", "imagenet", "--dest", str(tmp_path / "c")], "unknown corpus"),
        (["data", "fetch", "shakespeare", "--dest", str(tmp_path / "c"), "--from",
          str(tmp_path / "none.tar.gz")], "no such file"),
        (["bogus"], "unknown command"),
    ]
    for argv, pattern in cases:
        capsys.readouterr()
        try:
            rc = run(argv)
        except SystemExit as exc:  # argparse errors
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        assert pattern.lower() in lines[0].lower(), (argv, lines[0])


def test_bad_inputs_through_the_real_command(bpe_databin, tiny_ckpt, tmp_path):
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(tiny_ckpt.read_bytes()[:2000])
    assert_user_error(run_cli("eval-lm", bpe_databin.path, "--path", truncated), "truncated")
    assert_user_error(run_cli("train", bpe_databin.path, "--lr", "0", "--max-update", "2"), "--lr")


def test_failed_run_leaves_outputs_alone(bpe_databin, tiny_ckpt, tmp_path, capsys):
    """A refused eval does not touch an existing results file."""
    out = tmp_path / "res.json"
    out.write_text("{\"keep\": true}")
    rc = run(["eval-lm", str(bpe_databin.path), "--path", str(tiny_ckpt), "--gen-subset", "dev",
              "--results-path", str(out)])
    assert rc == 2 and out.read_text() == "{\"keep\": true}"


def test_train_refuses_a_save_dir_of_another_model(bpe_databin, tmp_path, capsys):
    base = ["train", str(bpe_databin.path), "--arch", "tiny", "--save-dir", str(tmp_path),
            "--tokens-per-sample", "16", "--max-tokens", "32", "--max-update", "1",
            "--validate-interval", "0", "--max-valid-tokens", "64", "--quiet"]
    assert run(base) == 0
    capsys.readouterr()
    assert run(base + ["--decoder-embed-dim", "48"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_the_original_flags_parse():
    """Every flag of the original kNN-LM code (paper notes §5) is accepted by name."""
    from knnlm.evaluate import EvalConfig
    from knnlm.knn.index import BuildIndexConfig
    from knnlm.lm.train import TrainConfig
    from knnlm.util import build_parser
    eval_lm = ("--knnlm --k 8 --lmbda 0.25 --probe 8 --dstore-filename d --indexfile i "
               "--dstore-size 10 --knn-keytype last_ffn_input --knn-sim-func do_not_recomp_l2 "
               "--faiss-metric-type l2 --no-load-keys --dstore-fp16 --move-dstore-to-mem "
               "--ignore-top --knnlm-gpu --dstore-mmap m --save-scores s --save-tokens t "
               "--save-knn-scores k --save-queries q --path p --gen-subset valid "
               "--tokens-per-sample 8 --context-window 4 --sample-break-mode none --max-tokens 64 "
               "--softmax-batch 8 --remove-bpe @@").split()
    build_index = ("--dstore_mmap d --dstore_size 10 --dimension 4 --ncentroids 8 --code_size 4 "
                   "--probe 8 --faiss_index f --num_keys_to_add_at_a_time 5 --starting_point 0 "
                   "--seed 1 --metric l2 --dstore_fp16").split()
    train = ("--pseudo-vocab-ratio 2 --num-extra-embed-file e --k-mos 2 --use-last-ffn-input "
             "--additional-linear --interpolated-loss --train-lambda 0.25 --finetune-out-embed "
             "--init-out-embed --use-l2 --norm-l2 --max-update 1").split()
    for cls, argv in ((EvalConfig, ["db"] + eval_lm), (BuildIndexConfig, build_index),
                      (TrainConfig, ["db"] + train)):
        build_parser(cls, "knnlm").parse_args(argv)      # SystemExit(2) on an unknown flag
