"""The command lines of the kNN-LM fork's scripts, flags as written there and paths
replaced, parse here and mean what they meant to fairseq: every line of every script
(fork_command_lines.txt) flag by flag, and the main script's lines (wikitext_bpe.sh:
preprocess, train, eval, the datastore dump, the index, the kNN-LM evaluations) field by
field against fairseq's reading."""
import importlib
import shlex
from pathlib import Path

import pytest

from conftest import refused
from knnlm.cli import COMMANDS
from knnlm.util import parse_config

# each fork command line: the program it ran, then its flags (paths as {placeholders})
FORK_LINES = {
    "preprocess": ("preprocess.py", """--only-source --trainpref {text}/train.txt
        --validpref {text}/valid.txt --testpref {text}/test.txt --destdir {out}/bin
        --workers 20"""),
    "train tied": ("train.py", """--task language_modeling {db} --save-dir {out}/tied
        --arch transformer_lm_wikibpe --share-decoder-input-output-embed
        --max-update 286000 --max-lr 1.0 --t-mult 2 --lr-period-updates 270000
        --lr-scheduler cosine --lr-shrink 0.75 --warmup-updates 16000 --warmup-init-lr 1e-07
        --min-lr 1e-09 --optimizer nag --lr 0.0001 --clip-norm 0.1 --max-tokens 3072
        --update-freq 3 --tokens-per-sample 3072 --seed 1 --sample-break-mode none
        --skip-invalid-size-inputs-valid-test --ddp-backend=no_c10d --fp16"""),
    "eval valid": ("eval_lm.py", """{db} --path {ckpt} --sample-break-mode complete
        --max-tokens 3072 --context-window 2560 --softmax-batch 1024 --gen-subset valid
        --bpe subword_nmt --remove-bpe"""),
    "eval train": ("eval_lm.py", """{db} --path {ckpt} --sample-break-mode none
        --max-tokens 3072 --softmax-batch 1024 --gen-subset train --context-window 1536
        --tokens-per-sample 1536 --fp16 --save-tokens {out}/train_tokens.npy
        --save-scores {out}/train_scores.npy"""),
    "dump": ("eval_lm.py", """{db} --path {ckpt} --sample-break-mode none --max-tokens 3072
        --softmax-batch 1024 --gen-subset train --context-window 1536 --tokens-per-sample 1536
        --dstore-mmap {out}/dstore --knn-keytype 'last_ffn_input' --dstore-size 153225485
        --model-overrides "{{'knn_keytype': 'last_ffn_input'}}" --save-knnlm-dstore --fp16
        --dstore-fp16"""),
    "kv3 att interpolated": ("train.py", """--task language_modeling {db} --save-dir {out}/kv3
        --arch transformer_lm_wikibpe --restore-file {ckpt} --reset-optimizer
        --reset-dataloader --reset-meters --knn-keytype last_ffn_input --use-last-ffn-input
        --finetune-out-embed --criterion agg_softmax --interpolated-loss --pseudo-vocab-ratio 3
        --no-epoch-checkpoints --max-update 286000 --lr 1.0 --lr-scheduler reduce_lr_on_plateau
        --lr-shrink 0.5 --warmup-updates 3000 --warmup-init-lr 1e-7 --optimizer nag
        --clip-norm 1 --max-tokens 3072 --update-freq 3 --tokens-per-sample 3072 --seed 1
        --sample-break-mode none --skip-invalid-size-inputs-valid-test --ddp-backend=no_c10d
        --fp16"""),
    "kv3 eval": ("eval_lm.py", """{db} --path {ckpt} --sample-break-mode complete
        --max-tokens 3072 --context-window 2560 --softmax-batch 1024
        --model-overrides "{{'interpolated_loss': False}}" --gen-subset valid --bpe subword_nmt
        --remove-bpe --pseudo-vocab-ratio 3 --save-scores {out}/kv3_scores.npy"""),
    "index": ("build_dstore.py", """--dstore_mmap {ds} --dstore_size 153225485
        --faiss_index {out}/knn.index --num_keys_to_add_at_a_time 500000 --starting_point 0
        --dstore-fp16 --dimension 1024"""),
    "knnlm faiss scores": ("eval_lm.py", """{db} --path {ckpt} --sample-break-mode complete
        --max-tokens 3072 --context-window 2560 --softmax-batch 1024 --gen-subset valid
        --dstore-filename {ds} --indexfile {out}/knn.index
        --model-overrides "{{'knn_keytype': 'last_ffn_input'}}" --k 1024 --lmbda 0.25
        --dstore-size 153225485 --knn-keytype last_ffn_input --knn-sim-func "do_not_recomp_l2"
        --no-load-keys --probe 32 --knnlm --fp16 --dstore-fp16 --bpe subword_nmt --remove-bpe"""),
    "knnlm": ("eval_lm.py", """{db} --path {ckpt} --sample-break-mode complete --max-tokens 3072
        --context-window 2560 --softmax-batch 1024 --gen-subset valid --dstore-filename {ds}
        --indexfile {out}/knn.index --model-overrides "{{'knn_keytype': 'last_ffn_input'}}"
        --k 1024 --lmbda 0.25 --dstore-size 153225485 --knn-keytype last_ffn_input --probe 32
        --knnlm --fp16 --dstore-fp16 --bpe subword_nmt --remove-bpe"""),
}
PROGRAMS = {"preprocess.py": "preprocess", "train.py": "train", "eval_lm.py": "eval-lm",
            "build_dstore.py": "build-index"}

# what fairseq made of each line, field by field
MEANING = {
    "preprocess": dict(only_source=True, workers=20, task="language_modeling"),
    "train tied": dict(task="language_modeling", arch="transformer_lm_wikibpe",
                       share_decoder_input_output_embed=True, max_update=286000, max_lr=1.0,
                       t_mult=2.0, lr_period_updates=270000, lr_scheduler="cosine",
                       lr_shrink=0.75, warmup_updates=16000, warmup_init_lr=1e-7, min_lr=1e-9,
                       optimizer="nag", lr=1e-4, clip_norm=0.1, max_tokens=3072,
                       update_freq=3, tokens_per_sample=3072, seed=1, sample_break_mode="none",
                       skip_invalid_size_inputs_valid_test=True, ddp_backend="no_c10d",
                       fp16=True, criterion="cross_entropy", momentum=0.99),
    # fairseq's eval_lm takes the model's window and subtracts the context: blocks of
    # whole lines up to 512 tokens after 2560 of context (knnlm: the model's window, 2560)
    "eval valid": dict(sample_break_mode="complete", max_tokens=3072, context_window=2560,
                       softmax_batch=1024, gen_subset="valid", bpe="subword_nmt",
                       remove_bpe="@@ ", tokens_per_sample=None, knnlm=False, probe=8),
    # --tokens-per-sample 1536 is ignored by fairseq's eval_lm (the model's 3072 is used)
    "eval train": dict(sample_break_mode="none", context_window=1536, tokens_per_sample=None,
                       gen_subset="train", fp16=True, remove_bpe=None),
    "dump": dict(save_knnlm_dstore=True, knn_keytype="last_ffn_input", dstore_size=153225485,
                 context_window=1536, tokens_per_sample=None, dstore_fp16=True, fp16=True),
    "kv3 att interpolated": dict(use_last_ffn_input=True, finetune_out_embed=True,
                                 interpolated_loss=True, pseudo_vocab_ratio=3,
                                 lr_scheduler="reduce_lr_on_plateau", lr_shrink=0.5, lr=1.0,
                                 warmup_updates=3000, warmup_init_lr=1e-7, optimizer="nag",
                                 clip_norm=1.0, reset_optimizer=True, criterion="agg_softmax",
                                 no_epoch_checkpoints=True, lr_threshold=1e-4, lr_patience=0),
    "kv3 eval": dict(pseudo_vocab_ratio=3, remove_bpe="@@ ", sample_break_mode="complete"),
    "index": dict(dstore_size=153225485, num_keys_to_add_at_a_time=500000, starting_point=0,
                  dstore_fp16=True, dimension=1024, knn_keytype="att", metric="l2"),
    "knnlm faiss scores": dict(knnlm=True, k=1024, lmbda=0.25, knn_keytype="last_ffn_input",
                               knn_sim_func="do_not_recomp_l2", load_keys=False, probe=32,
                               dstore_size=153225485, sample_break_mode="complete",
                               context_window=2560, remove_bpe="@@ ", faiss_metric_type="l2"),
    "knnlm": dict(knnlm=True, k=1024, lmbda=0.25, knn_sim_func=None, load_keys=True, probe=32,
                  exact_search=False, ignore_top=False),
}


@pytest.fixture(scope="module")
def paths(bpe_databin, trained_ckpt, trained_dstore, corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fork")
    return dict(db=str(bpe_databin.path), ckpt=str(trained_ckpt), ds=str(trained_dstore.path),
                text=str(corpus_dir), out=str(out))


@pytest.mark.parametrize("name", list(FORK_LINES))
def test_a_fork_command_line_parses_with_fairseqs_meaning(name, paths):
    program, flags = FORK_LINES[name]
    command = PROGRAMS[program]
    module_name, cls_name, _ = COMMANDS[command]
    cls = getattr(importlib.import_module(module_name), cls_name)
    cfg = parse_config(cls, shlex.split(flags.format(**paths)), prog=f"knnlm {command}")
    for field, value in MEANING[name].items():
        assert getattr(cfg, field) == value, (name, field, getattr(cfg, field), value)
    if name == "dump":
        dump = cfg.to_build_dstore()
        assert dump.keytypes == ["att"] and not dump.dstore_fp32 and dump.context_window == 1536


def test_eval_lm_checks_pseudo_vocab_ratio_against_the_checkpoint(paths, capsys):
    """fairseq's --pseudo-vocab-ratio on eval_lm sets the model's head; here the head comes
    from the checkpoint, so the flag must agree with it (the trained LM has 1 row a token)."""
    from knnlm.cli import run
    base = ["eval-lm", paths["db"], "--path", paths["ckpt"], "--gen-subset", "valid",
            "--tokens-per-sample", "64", "--max-eval-tokens", "100", "--quiet"]
    assert run(base + ["--pseudo-vocab-ratio", "1"]) == 0
    capsys.readouterr()
    assert run(base + ["--pseudo-vocab-ratio", "3"]) == 2
    assert "the checkpoint's head has --pseudo-vocab-ratio 1" in capsys.readouterr().err


def test_fairseq_flags_that_cannot_mean_the_same_here_are_refused(paths, capsys):
    base = ["train", paths["db"], "--max-update", "1", "--save-dir", paths["out"] + "/x"]
    cases = [(base + ["--criterion", "adaptive_loss"], "adaptive softmax are not"),
             (base + ["--reset-optimizer"], "--reset-optimizer does nothing without "
                                            "--restore-file"),
             (base + ["--no-epoch-checkpoints", "--save-interval", "1"], "exclusive"),
             (["eval-lm", paths["db"], "--path", paths["ckpt"], "--model-overrides",
               "{'dropout': 0.1}"], "are understood here"),
             (["eval-lm", paths["db"], "--path", paths["ckpt"], "--knn-keytype", "ffn",
               "--model-overrides", "{'knn_keytype': 'last_ffn_input'}"], "disagrees"),
             (["eval-lm", paths["db"], "--path", paths["ckpt"], "--task", "translation"],
              "invalid choice"),
             (["build-dstore", paths["db"], "--path", paths["ckpt"], "--dstore-dir",
               paths["out"] + "/d", "--dstore-fp16", "--dstore-fp32"], "exclusive")]
    for argv, needle in cases:
        assert refused(argv, capsys, needle) is None, argv


FILE_LINES = [line.split(" ", 2) for line in
              (Path(__file__).parent / "fork_command_lines.txt").read_text().splitlines()
              if line and not line.startswith("#")]
# typed flags whose fairseq meaning knnlm holds in another form: the check of that meaning
TRANSLATED = {
    ("build-index", "dstore_mmap"): lambda cfg, v: cfg.dstore_dir == v,
    ("eval-lm", "no_load_keys"): lambda cfg, v: cfg.load_keys is False,
    ("eval-lm", "remove_bpe"): lambda cfg, v: cfg.remove_bpe == (v if v is not True else "@@ "),
    # fairseq's eval_lm takes the model's window whatever --tokens-per-sample says
    ("eval-lm", "tokens_per_sample"): lambda cfg, v: cfg.tokens_per_sample is None,
}


def typed_flags(argv: list[str]) -> dict:
    """{field name: value as typed, True for a switch} of a fairseq command line."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            if "=" in a:
                name, v = a[2:].split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                name, v = a[2:], argv[i + 1]
                i += 1
            else:
                name, v = a[2:], True
            out[name.replace("-", "_")] = v
        i += 1
    return out


def same(got, typed) -> bool:
    if typed is True or isinstance(got, bool):
        return got is typed
    if isinstance(got, (int, float)):
        return float(got) == float(typed)
    return got == typed


@pytest.mark.parametrize("script,program,flags", FILE_LINES,
                         ids=[f"{s}:{n}" for n, (s, _, _) in enumerate(FILE_LINES)])
def test_every_fork_command_line_parses_with_each_flag_where_fairseq_put_it(
        script, program, flags, paths):
    command = PROGRAMS[program]
    module_name, cls_name, _ = COMMANDS[command]
    cls = getattr(importlib.import_module(module_name), cls_name)
    argv = shlex.split(flags.replace("{db}", paths["db"]).replace("{out}", paths["out"]))
    cfg = parse_config(cls, argv, prog=f"knnlm {command}")
    for name, typed in typed_flags(argv).items():
        check = TRANSLATED.get((command, name))
        if check is not None:
            assert check(cfg, typed), (name, typed)
        else:
            assert same(getattr(cfg, name), typed), (name, typed, getattr(cfg, name))


def test_eval_lm_model_arguments_are_checked_against_the_checkpoint(paths, bpe_databin,
                                                                    capsys, tmp_path):
    """wikitext_bpe_extra_embed_att_finetune.sh evaluates its model with
    --num-extra-embed-file and the use_last_ffn_input override, _mos_finetune.sh with --k-mos:
    fairseq built the head from them; here they must describe the checkpoint's head."""
    from knnlm.cli import run
    from knnlm.lm.heads_train import AllotConfig
    from knnlm.lm.heads_train import main as allot
    extra, other = tmp_path / "extra.json", tmp_path / "other.json"
    allot(AllotConfig(data=paths["db"], out=str(extra), total_ratio=2.0))
    allot(AllotConfig(data=paths["db"], out=str(other), total_ratio=1.5))
    ckpt = tmp_path / "ft" / "checkpoint_last.pt"
    assert run(["train", paths["db"], "--restore-file", paths["ckpt"], "--knn-keytype",
                "last_ffn_input", "--use-last-ffn-input", "--num-extra-embed-file", str(extra),
                "--finetune-out-embed", "--criterion", "agg_softmax", "--max-update", "1",
                "--tokens-per-sample", "64", "--max-tokens", "256", "--optimizer", "nag",
                "--lr", "1e-2", "--save-dir", str(tmp_path / "ft"), "--quiet"]) == 0
    base = ["eval-lm", paths["db"], "--gen-subset", "valid", "--max-eval-tokens", "200",
            "--tokens-per-sample", "64", "--quiet"]
    att = ["--model-overrides", "{'knn_keytype': 'last_ffn_input', 'use_last_ffn_input': True}"]
    assert run(base + ["--path", str(ckpt), "--num-extra-embed-file", str(extra),
                       "--k-mos", "1", "--pseudo-vocab-ratio", "1"] + att) == 0
    for argv, needle in [
            (base + ["--path", str(ckpt), "--num-extra-embed-file", str(other)],
             "has other extra rows"),
            (base + ["--path", paths["ckpt"]] + att, "softmax input att: the checkpoint's "
                                                    "head has"),
            (base + ["--path", str(ckpt), "--k-mos", "3"], "--k-mos 3: the checkpoint's head "
                                                          "has --k-mos 1")]:
        assert refused(argv, capsys, needle) is None, argv
