"""`knnlm preprocess`: tokenize text splits into a data-bin directory.

Inputs: text files (``--trainpref``, ``--validpref``, ``--testpref``; or ``--srcdir`` with
``{train,valid,test}.txt``). Outputs in ``--destdir``: ``{split}.npy`` token arrays
(uint16 when the vocabulary fits, else int32), the vocabulary (``tokenizer.json`` or
fairseq ``dict.txt``) and ``data.json`` (vocabulary, token counts, source hashes).

    knnlm preprocess --srcdir runs/demo/corpus --destdir runs/demo/data-bin --vocab-size 8000
    knnlm preprocess --only-source --trainpref wt103/train.txt --validpref wt103/valid.txt \\
        --testpref wt103/test.txt --destdir data-bin/wt103 --thresholdsrc 3
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..guard import check_output, output_lock, temp_path
from ..io import (ENCODING_ERRORS, open_npy, read_sidecar, read_text, rewrite_output,
                  sha256_file, write_json_atomic)
from ..util import FairseqTaskFlags, UserError, config_dict, flag
from .subword import SubwordBPE
from .tokenizer import BPETokenizer, Dictionary, HFTokenizer, load_vocab, vocab_summary

DATA_FORMAT = "knnlm-data-bin"
BPE_CODES = "bpe_codes.json"     # the subword BPE a dict.txt data-bin was split with
DATA_VERSION = 1
LINES_PER_BATCH = 10_000
UINT16_LIMIT = 1 << 16


@dataclass
class PreprocessConfig(FairseqTaskFlags):
    destdir: str = flag(help="output data-bin directory")
    srcdir: str | None = flag(None, "directory with train.txt / valid.txt / test.txt "
                              "(what `knnlm data fetch` writes)")
    trainpref: str | None = flag(None, "training text file")
    validpref: str | None = flag(None, "validation text file(s), comma separated")
    testpref: str | None = flag(None, "test text file(s), comma separated")
    only_source: bool = flag(False, "whitespace-tokenized text and a fairseq dict.txt "
                             "(WikiText word level, or subword-nmt BPE with '@@ ' markers)")
    srcdict: str | None = flag(None, "--only-source: reuse this dict.txt instead of building one")
    thresholdsrc: int = flag(0, "--only-source: map words seen fewer times to <unk>")
    nwordssrc: int = flag(-1, "--only-source: keep at most this many words (-1: all)")
    padding_factor: int = flag(8, "--only-source: pad the dictionary to a multiple of this")
    subword_bpe: int = flag(0, "--only-source: first learn a subword-nmt style BPE of this many "
                            "pieces on the training text and split every split's words with "
                            "it ('@@ ' markers; word perplexity with eval-lm --remove-bpe '@@ ')")
    bpe_codes: str | None = flag(None, "--only-source: split words with these learned BPE codes "
                                 "(a data-bin's bpe_codes.json) instead of learning them")
    vocab_size: int = flag(8000, "byte-level BPE: vocabulary size to train")
    tokenizer: str | None = flag(None, "byte-level BPE: use this tokenizer.json instead of training")
    gpt2_encoder_json: str | None = flag(None, "byte-level BPE: GPT-2 vocab.json",
                                         aliases=("--encoder-json",))
    gpt2_vocab_bpe: str | None = flag(None, "byte-level BPE: GPT-2 merges.txt",
                                      aliases=("--vocab-bpe",))
    hf_tokenizer: str | None = flag(None, "the tokenizer of an HF model (name or local "
                                    "directory, offline): text keeps its newlines")
    hf_dataset: str | None = flag(None, "instead of text files: an HF dataset (a save_to_disk "
                                  "directory, data files, or a cached hub name; offline), "
                                  "streamed to DESTDIR/text/<split>.txt")
    split: str = flag("train", "--hf-dataset: its splits to binarize, comma separated "
                      "(validation becomes the data-bin's valid)")
    text_column: str = flag("text", "--hf-dataset: the column holding the text")
    encoding: str = flag("utf-8", "encoding of the text files")
    errors: str = flag("strict", "undecodable bytes are refused (strict, naming the byte "
                       "offset) or replaced / dropped", choices=ENCODING_ERRORS)
    workers: int = flag(1, "fairseq's worker processes: accepted; binarizing runs in one")
    overwrite: bool = flag(False, "replace a data-bin made with other settings")
    quiet: bool = flag(False, "no progress bars")

    def __post_init__(self):
        if self.hf_dataset:
            text = Path(self.destdir) / "text"
            if self.srcdir or any(getattr(self, f"{n}pref") not in (None, str(text / f"{n}.txt"))
                                  for n in ("train", "valid", "test")):
                raise UserError("--hf-dataset replaces --srcdir and the --*pref text files")
            for name in self.dataset_splits().values():
                if name not in ("train", "valid", "test"):
                    raise UserError(f"--split: a data-bin holds train, valid and test; "
                                    f"{name!r} is none of them")
                setattr(self, f"{name}pref", str(Path(self.destdir) / "text" / f"{name}.txt"))
        if self.srcdir:
            for split in ("train", "valid", "test"):
                attr = f"{split}pref"
                if getattr(self, attr) is None:
                    setattr(self, attr, str(Path(self.srcdir) / f"{split}.txt"))
        if not self.trainpref and not self.srcdict and not self.tokenizer \
                and not self.gpt2_encoder_json and not self.hf_tokenizer:
            raise UserError("--trainpref (or --srcdir) is required to build a vocabulary")
        if bool(self.gpt2_encoder_json) != bool(self.gpt2_vocab_bpe):
            raise UserError("--gpt2-encoder-json and --gpt2-vocab-bpe go together")
        if sum(map(bool, (self.only_source, self.tokenizer, self.gpt2_encoder_json,
                          self.hf_tokenizer))) > 1:
            raise UserError("choose one vocabulary: --only-source, --tokenizer, "
                            "--gpt2-encoder-json or --hf-tokenizer")
        if self.only_source and (self.tokenizer or self.gpt2_encoder_json):
            raise UserError("--only-source uses a dict.txt; it cannot take --tokenizer")
        if self.vocab_size < 300:
            raise UserError(f"--vocab-size must be >= 300 (256 bytes + specials), got {self.vocab_size}")
        if self.padding_factor < 1:
            raise UserError(f"--padding-factor must be >= 1, got {self.padding_factor}")
        if (self.subword_bpe or self.bpe_codes) and not self.only_source:
            raise UserError("--subword-bpe and --bpe-codes make '@@' pieces for a dict.txt: "
                            "add --only-source")
        if self.subword_bpe < 0 or (self.subword_bpe and self.bpe_codes):
            raise UserError("--subword-bpe takes a size > 0, and not with --bpe-codes")


    def dataset_splits(self) -> dict[str, str]:
        """--hf-dataset's splits -> the data-bin's split names."""
        from .hf_datasets import SPLIT_NAMES
        names = [s.strip() for s in self.split.split(",") if s.strip()]
        if not names:
            raise UserError("--split is empty")
        return {s: SPLIT_NAMES.get(s, s) for s in names}


def dataset_to_text(cfg: PreprocessConfig) -> None:
    """--hf-dataset: stream each split's texts to DESTDIR/text/<split>.txt (the --*pref
    flags already point there)."""
    from .hf_datasets import load_dataset, write_texts
    for source, name in cfg.dataset_splits().items():
        path = Path(getattr(cfg, f"{name}pref"))
        info = write_texts(load_dataset(cfg.hf_dataset, source), path, cfg.text_column,
                           cfg.quiet)
        print(f"{cfg.hf_dataset} [{source}]: {info['texts']:,} texts -> {path}")


def _split_files(cfg: PreprocessConfig) -> dict[str, list[Path]]:
    out = {}
    for split in ("train", "valid", "test"):
        value = getattr(cfg, f"{split}pref")
        if not value:
            continue
        paths = [Path(p) for p in value.split(",")]
        for i, p in enumerate(paths):
            if not p.is_file():
                raise UserError(f"--{split}pref: no such file {p}")
            name = split if i == 0 else f"{split}{i}"
            out[name] = [p]
    return out


def _read_lines(path: Path, cfg: "PreprocessConfig") -> list[str]:
    return text_lines(read_text(path, "input", cfg.encoding, cfg.errors))


def text_lines(text: str) -> list[str]:
    """The lines of a text as a text file is read (\n, \r\n and \r end a line)."""
    return [line.rstrip("\r\n") for line in io.StringIO(text, newline=None)]


def build_vocab(cfg: PreprocessConfig, files: dict[str, list[Path]],
                train_lines: list[str] | None = None):
    if cfg.only_source:
        if cfg.srcdict:
            return Dictionary.load(cfg.srcdict)
        return Dictionary.build(train_lines if train_lines is not None
                                else _read_lines(files["train"][0], cfg), cfg.thresholdsrc,
                                cfg.nwordssrc, cfg.padding_factor)
    if cfg.hf_tokenizer:
        from ..hub import load_hf_tokenizer
        return HFTokenizer.from_hf(load_hf_tokenizer(cfg.hf_tokenizer))
    if cfg.tokenizer:
        return BPETokenizer.load(cfg.tokenizer)
    if cfg.gpt2_encoder_json:
        return BPETokenizer.from_gpt2(cfg.gpt2_encoder_json, cfg.gpt2_vocab_bpe)
    return BPETokenizer.train(_read_lines(files["train"][0], cfg), cfg.vocab_size)


def binarize(lines: list[str], vocab, quiet: bool = True) -> tuple[np.ndarray, int]:
    """All lines as one token stream (each line's ids, then ``</s>``) and the <unk> count."""
    dtype = np.uint16 if len(vocab) <= UINT16_LIMIT else np.int32
    parts = []
    for start in tqdm(range(0, len(lines), LINES_PER_BATCH), disable=True if quiet else None, unit="batch",
                      desc="binarize"):
        parts.extend(vocab.encode_lines(lines[start:start + LINES_PER_BATCH]))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    unk = int((ids == vocab.unk).sum()) if vocab.kind == "dict" else 0
    return ids.astype(dtype), unk


def check_inputs(files: dict[str, list[Path]], cfg: PreprocessConfig) -> None:
    """Every input decodes and holds text, before anything in the data-bin is written."""
    for split, paths in files.items():
        if not read_text(paths[0], f"--{split}pref", cfg.encoding, cfg.errors).strip():
            raise UserError(f"{paths[0]} (the {split} split) holds no text")


def main(cfg: PreprocessConfig) -> dict:
    files = {} if cfg.hf_dataset else _split_files(cfg)   # (the dataset's: written below)
    check_output(cfg.destdir, "dir", "--destdir")
    check_inputs(files, cfg)
    with output_lock(cfg.destdir, "dir", "data-bin"):
        if cfg.hf_dataset:      # the output rule first: nothing written before a refusal
            Path(cfg.destdir).mkdir(parents=True, exist_ok=True)
            rewrite_output(Path(cfg.destdir) / "data.json", "data-bin", config_dict(cfg),
                           cfg.overwrite)
            dataset_to_text(cfg)
            files = _split_files(cfg)
            check_inputs(files, cfg)
        return _preprocess(cfg, files)


def _preprocess(cfg: PreprocessConfig, files: dict[str, list[Path]]) -> dict:
    dest = Path(cfg.destdir)
    dest.mkdir(parents=True, exist_ok=True)
    rewrite_output(dest / "data.json", "data-bin", config_dict(cfg), cfg.overwrite)
    bpe, texts = None, {}
    if cfg.subword_bpe or cfg.bpe_codes:      # split the words into '@@' pieces first
        texts = {split: _read_lines(paths[0], cfg) for split, paths in files.items()}
        if cfg.bpe_codes:
            bpe = SubwordBPE.load(cfg.bpe_codes)
        elif "train" not in texts:
            raise UserError("--subword-bpe learns on the training text: give --trainpref")
        else:
            bpe = SubwordBPE.learn(texts["train"], cfg.subword_bpe)
        bpe.save(dest / BPE_CODES)
        texts = {split: bpe.apply(lines) for split, lines in texts.items()}
    vocab = build_vocab(cfg, files, texts.get("train"))
    vocab_path = dest / vocab.filename
    vocab.save(vocab_path)
    meta = dict(format=DATA_FORMAT, version=DATA_VERSION, config=config_dict(cfg),
                tokenizer=dict(vocab_summary(vocab), sha256=sha256_file(vocab_path),
                               hf_name=cfg.hf_tokenizer), splits={})
    if bpe is not None:
        meta["tokenizer"].update(bpe_codes=BPE_CODES, bpe_codes_sha256=sha256_file(dest / BPE_CODES))
    for split, paths in files.items():
        lines = texts[split] if bpe is not None else _read_lines(paths[0], cfg)
        ids, unk = binarize(lines, vocab, quiet=cfg.quiet)
        out = dest / f"{split}.npy"
        tmp = temp_path(out, ".npy")
        np.save(tmp, ids)
        tmp.replace(out)
        meta["splits"][split] = dict(file=out.name, tokens=int(len(ids)), lines=len(lines),
                                     dtype=str(ids.dtype), unk=unk, source=str(paths[0]),
                                     source_sha256=sha256_file(paths[0]))
        print(f"{split:6s}: {len(lines):>9,d} lines -> {len(ids):>11,d} tokens"
              + (f" ({100 * unk / max(1, len(ids)):.2f}% <unk>)" if vocab.kind == "dict" else ""))
    write_json_atomic(dest / "data.json", meta)
    print(f"vocabulary: {len(vocab):,d} ({vocab.kind}) -> {vocab_path}")
    return meta


def append_split(path: str | Path, split: str, ids: np.ndarray, n_lines: int,
                 record: dict) -> bool:
    """Append ``ids`` to the data-bin's ``split`` (Datastore.add). The longer array is
    written under a new name, then ``data.json`` (the commit point) names it, then the old
    array goes: a kill leaves the data-bin as it was or as it is after. ``record`` (what
    was appended: texts, tokens, their sha256) is listed under the split's ``appended``;
    False when the last record already is this one (a resumed add: nothing to do)."""
    dest = Path(path)
    meta = read_sidecar(dest, "data.json", DATA_FORMAT, "data-bin")
    info = meta["splits"].get(split)
    if info is None:
        raise UserError(f"split {split!r} not in {dest}")
    done = info.get("appended", [])
    if done and done[-1] == record:
        return False
    old = open_npy(dest / info["file"], (info["tokens"],), info["dtype"])
    if len(ids) and int(np.max(ids)) > np.iinfo(np.dtype(info["dtype"])).max:
        raise UserError(f"{dest}: token ids beyond its {info['dtype']} split array")
    name = f"{split}.{len(done) + 1}.npy"
    tmp = temp_path(dest / name, ".npy")
    np.save(tmp, np.concatenate([np.asarray(old), ids.astype(info["dtype"])]))
    tmp.replace(dest / name)
    meta["splits"][split] = dict(info, file=name, tokens=int(info["tokens"] + len(ids)),
                                 lines=int(info["lines"] + n_lines), appended=[*done, record])
    write_json_atomic(dest / "data.json", meta)
    if info["file"] != name:
        (dest / info["file"]).unlink(missing_ok=True)
    return True


class DataBin:
    """A data-bin directory, validated: its sidecar, vocabulary and split arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_sidecar(self.path, "data.json", DATA_FORMAT, "data-bin")
        self.tokenizer_sha256 = self.meta["tokenizer"]["sha256"]
        vocab_file = self.path / self.meta["tokenizer"]["file"]
        if vocab_file.is_file() and sha256_file(vocab_file) != self.tokenizer_sha256:
            raise UserError(f"{vocab_file} changed since the data-bin was written")
        self.vocab_size = int(self.meta["tokenizer"]["size"])
        self._vocab = None

    @property
    def vocab(self):
        if self._vocab is None:
            self._vocab = load_vocab(self.path, self.meta)
        return self._vocab

    @property
    def eos(self) -> int:
        return int(self.meta["tokenizer"]["eos"])

    @property
    def pad(self) -> int:
        return int(self.meta["tokenizer"]["pad"])

    def split(self, name: str) -> np.ndarray:
        """The split's tokens as a read-only memmap (never loaded whole)."""
        info = self.meta["splits"].get(name)
        if info is None:
            raise UserError(f"split {name!r} not in {self.path} (has: "
                            f"{', '.join(self.meta['splits'])})")
        return open_npy(self.path / info["file"], (info["tokens"],), info["dtype"])
