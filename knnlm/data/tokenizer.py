"""Vocabularies: a fairseq-format :class:`Dictionary` for already-tokenized text and a
byte-level BPE :class:`BPETokenizer` (HF ``tokenizers``).

Both number the specials the way fairseq does (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
``<unk>`` 3) and turn a line of text into its ids followed by ``</s>``. Both also say which
tokens count as words for per-word perplexity (:meth:`word_flags`).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from ..util import UserError
from .subword import SubwordBPE

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOS, PAD, EOS, UNK = range(4)
# fairseq pads dictionaries to a multiple of 8 with made-up words (faster softmax on GPU).
PADDING_FACTOR = 8
# Byte-level word flags (see BPETokenizer.word_flags).
WORD_START, SPACE = 1, 2


class Dictionary:
    """fairseq's ``dict.txt`` vocabulary: one ``token count`` per line, specials implicit."""

    kind = "dict"
    num_specials = len(SPECIALS)     # fairseq's nspecial: <s>, <pad>, </s>, <unk> first
    filename = "dict.txt"

    def __init__(self, symbols: list[str], counts: list[int], bpe=None):
        self.bpe = bpe            # a SubwordBPE that splits new text into this dict's pieces
        self.symbols = list(symbols)
        self.counts = list(counts)
        self.indices = {s: i for i, s in enumerate(self.symbols)}
        self.eos, self.pad, self.bos, self.unk = EOS, PAD, BOS, UNK

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def build(cls, lines: Iterable[str], threshold: int = 0, nwords: int = -1,
              padding_factor: int = PADDING_FACTOR) -> "Dictionary":
        counter: Counter = Counter()
        for line in lines:
            counter.update(line.split())
        for s in SPECIALS:
            counter.pop(s, None)
        # Most frequent first, ties alphabetical (fairseq's finalize order).
        items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        items = [(w, c) for w, c in items if c >= threshold]
        if nwords > 0:
            items = items[: max(0, nwords - len(SPECIALS))]
        symbols = list(SPECIALS) + [w for w, _ in items]
        counts = [1] * len(SPECIALS) + [c for _, c in items]
        i = 0
        while padding_factor > 1 and len(symbols) % padding_factor:
            symbols.append(f"madeupword{i:04d}")
            counts.append(0)
            i += 1
        return cls(symbols, counts)

    @classmethod
    def load(cls, path: str | Path) -> "Dictionary":
        symbols, counts = list(SPECIALS), [1] * len(SPECIALS)
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read dictionary {path} ({exc})")
        for n, line in enumerate(lines, 1):
            parts = line.rstrip().rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{path}:{n}: expected '<token> <count>', got {line!r}")
            word = parts[0]
            if word in SPECIALS:
                continue
            symbols.append(word)
            counts.append(int(parts[1]))
        return cls(symbols, counts)

    def save(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            for s, c in zip(self.symbols[len(SPECIALS):], self.counts[len(SPECIALS):]):
                fh.write(f"{s} {c}\n")

    def encode_lines(self, lines: list[str]) -> list[np.ndarray]:
        """Ids of whitespace-tokenized lines (pieces already, when the data-bin has BPE
        codes: preprocess splits them; prompts go through :meth:`encode_text`)."""
        get = self.indices.get
        return [np.array([get(w, UNK) for w in line.split()] + [EOS], dtype=np.int64)
                for line in lines]

    def encode_text(self, text: str) -> np.ndarray:
        """Ids of a text without the line-end ``</s>`` (a prompt), its words split into the
        data-bin's BPE pieces when it has codes."""
        if self.bpe is not None:
            text = self.bpe.apply([text])[0]
        return np.array([self.indices.get(w, UNK) for w in text.split()], dtype=np.int64)

    def piece(self, i: int) -> str:
        return self.symbols[i]

    def decode(self, ids: Iterable[int], bpe_cont: str | None = "@@") -> str:
        out = []
        for i in ids:
            out.append("\n" if i == EOS else self.symbols[i] + " ")
        text = "".join(out).replace(" \n", "\n")
        if bpe_cont:
            text = text.replace(bpe_cont + " ", "")
        return text

    def word_flags(self, bpe_cont: str | None) -> np.ndarray:
        """``ends_word[id]``: the token closes a word (not a ``@@`` continuation)."""
        flags = np.ones(len(self), dtype=bool)
        if bpe_cont:
            for i, s in enumerate(self.symbols):
                if i >= len(SPECIALS) and s.endswith(bpe_cont):
                    flags[i] = False
        return flags


class BPETokenizer:
    """Byte-level BPE through HF ``tokenizers``; one line of text at a time, ``</s>`` after."""

    kind = "bpe"
    num_specials = len(SPECIALS)     # trained with the specials as ids 0..3
    filename = "tokenizer.json"

    def __init__(self, tok, specials: dict | None = None):
        self.tok = tok
        vocab = tok.get_vocab()
        self._size = tok.get_vocab_size()
        if specials is not None:  # recorded ids (an HF model's tokenizer)
            self.eos, self.pad, self.bos, self.unk = (int(specials[k]) for k in
                                                      ("eos", "pad", "bos", "unk"))
            return
        eos_name = next((s for s in ("</s>", "<|endoftext|>") if s in vocab), None)
        if eos_name is None:
            raise UserError("tokenizer has neither '</s>' nor '<|endoftext|>' to end lines with")
        self.eos = vocab[eos_name]
        self.pad = vocab.get("<pad>", self.eos)
        self.bos = vocab.get("<s>", self.eos)
        self.unk = vocab.get("<unk>", self.eos)

    def __len__(self) -> int:
        return self._size

    @classmethod
    def train(cls, lines: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(lines, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path, specials: dict | None = None) -> "BPETokenizer":
        from tokenizers import Tokenizer
        try:
            return cls(Tokenizer.from_file(str(path)), specials)
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise UserError(f"cannot load tokenizer {path} ({str(exc).splitlines()[0]})")

    @classmethod
    def from_gpt2(cls, vocab_json: str | Path, merges_txt: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        try:
            tok = Tokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        except Exception as exc:
            raise UserError(f"cannot read GPT-2 BPE files ({str(exc).splitlines()[0]})")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    def encode_lines(self, lines: list[str]) -> list[np.ndarray]:
        encs = self.tok.encode_batch(lines, add_special_tokens=False)
        return [np.array(e.ids + [self.eos], dtype=np.int64) for e in encs]

    def encode_text(self, text: str) -> np.ndarray:
        """Ids of a text without the line-end ``</s>`` (a prompt)."""
        return np.array(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def decode(self, ids: Iterable[int]) -> str:
        lines, cur = [], []
        for i in ids:
            if i == self.eos:
                lines.append(self.tok.decode(cur, skip_special_tokens=False))
                cur = []
            else:
                cur.append(int(i))
        text = "\n".join(lines) + ("\n" if lines else "")
        return text + (self.tok.decode(cur, skip_special_tokens=False) if cur else "")

    def word_flags(self, bpe_cont: str | None = None) -> np.ndarray:
        """Per id: ``WORD_START`` (text begins with whitespace, then a word), ``SPACE``
        (whitespace only) or 0 (continues a word)."""
        flags = np.zeros(len(self), dtype=np.int8)
        for i in range(len(self)):
            text = self.tok.decode([i], skip_special_tokens=False)
            if not text or text.isspace():
                flags[i] = SPACE
            elif text[0].isspace():
                flags[i] = WORD_START
        flags[self.eos] = WORD_START
        return flags


class HFTokenizer(BPETokenizer):
    """The tokenizer of an HF model (``preprocess --hf-tokenizer``). The text keeps its
    newlines (lines are encoded in chunks joined by ``\n``; no separator tokens), and the
    stream starts with the model's BOS token (EOS when it has none), recorded as ``eos``:
    the token fed before the first one."""

    kind = "hf"
    num_specials = 0                 # an HF vocabulary has no leading block of specials
    LINES_PER_CHUNK = 64
    WORD_MARKS = ("Ġ", "▁")          # byte-level BPE / sentencepiece word-start markers
    SPACE_PIECES = ("Ċ", "ĊĊ", "<0x0A>", "▁", "Ġ")

    @classmethod
    def from_hf(cls, hf_tok) -> "HFTokenizer":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
        tok.no_padding()        # settings of a batch (padding side, say) that change no id:
        tok.no_truncation()     # one vocabulary, one tokenizer file, one fingerprint
        start = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
        if start is None:
            raise UserError("the HF tokenizer has neither a BOS nor an EOS token to start "
                            "the stream with")
        pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else start
        unk = hf_tok.unk_token_id if hf_tok.unk_token_id is not None else start
        return cls(tok, dict(eos=start, pad=pad, bos=start, unk=unk))

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_lines(self, lines: list[str]) -> list[np.ndarray]:
        chunks = ["\n".join(lines[i:i + self.LINES_PER_CHUNK]) + "\n"
                  for i in range(0, len(lines), self.LINES_PER_CHUNK)]
        encs = self.tok.encode_batch(chunks, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def word_flags(self, bpe_cont: str | None = None) -> np.ndarray:
        """Per id, from the piece's spelling: word-start marker -> ``WORD_START``, a
        newline or bare marker -> ``SPACE``, else 0 (continues a word)."""
        flags = np.zeros(len(self), dtype=np.int8)
        for i in range(len(self)):
            piece = self.tok.id_to_token(i) or ""
            if piece in self.SPACE_PIECES or not piece.strip("ĊĠ▁ \n"):
                flags[i] = SPACE
            elif piece.startswith(self.WORD_MARKS):
                flags[i] = WORD_START
        return flags


def word_mask(targets: np.ndarray, prev: np.ndarray, vocab, flags: np.ndarray) -> np.ndarray:
    """(N,) bool: which of ``targets`` count as words (``prev[i]`` precedes ``targets[i]``).

    Dictionary vocabularies count word ends (tokens that are not ``@@`` continuations);
    byte-level BPE counts word starts: a piece with a leading space, ``</s>``, or the first
    non-blank piece of a line. Summed log-probs divided by the count give per-word
    perplexity.
    """
    if vocab.kind == "dict":
        return flags[targets].astype(bool)
    f = flags[targets]
    starts = (f == WORD_START) | ((prev == vocab.eos) & (f != SPACE))
    if vocab.kind == "hf":   # text with newlines: the first piece after one starts a word
        starts |= (flags[prev] == SPACE) & (f != SPACE)
    return starts


def count_words(targets: np.ndarray, prev: np.ndarray, vocab, flags: np.ndarray) -> int:
    return int(word_mask(targets, prev, vocab, flags).sum())


def load_vocab(data_dir: str | Path, meta: dict):
    """The vocabulary a data-bin was made with (kind from its ``data.json``)."""
    tok = meta["tokenizer"]
    path = Path(data_dir) / tok["file"]
    if not path.is_file():
        raise UserError(f"{path} missing from the data-bin")
    if tok["kind"] == "dict":
        vocab = Dictionary.load(path)
        if tok.get("bpe_codes"):
            vocab.bpe = SubwordBPE.load(Path(data_dir) / tok["bpe_codes"])
        return vocab
    if tok["kind"] == "hf":
        return HFTokenizer.load(path, tok)
    return BPETokenizer.load(path)


def vocab_summary(vocab) -> dict:
    return dict(kind=vocab.kind, file=vocab.filename, size=len(vocab), eos=vocab.eos,
                pad=vocab.pad, bos=vocab.bos, unk=vocab.unk)


__all__ = ["Dictionary", "BPETokenizer", "HFTokenizer", "count_words", "word_mask", "load_vocab", "vocab_summary",
           "SPECIALS", "EOS", "PAD", "BOS", "UNK"]
