"""The command lines of the kNN-LM fork's main script (wikitext_bpe.sh: preprocess, train,
eval, the datastore dump, the index, the kNN-LM evaluations), flags as written there and
paths replaced, parse here and mean what they meant to fairseq."""
import shlex

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
    import importlib
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
