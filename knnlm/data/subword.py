"""subword-nmt style BPE: the tokenization of the original kNN-LM WikiText-103 data.

Words (whitespace-separated) are split into pieces learned by byte-pair merges on the
training text; every piece but a word's last carries the ``@@`` continuation marker, so
``text.replace("@@ ", "")`` gives the words back and word-level perplexity is eval-lm's
``--remove-bpe '@@ '``. The pieces then go through an ordinary fairseq ``dict.txt``
(``preprocess --only-source --subword-bpe SIZE``). Learning and applying run in HF
``tokenizers`` (a BPE model whose word-final pieces carry an end-of-word suffix, turned into
markers on the other pieces); ``<unk>`` (WikiText's) stays one word, a character never seen
in training becomes ``<unk>``.

    bpe = SubwordBPE.learn(train_lines, size=32000)
    bpe.apply(["the unbelievable story"])   # ['the un@@ believ@@ able story']
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..util import UserError

END = "</w>"          # marks a word's last piece inside the tokenizers model
MARK = "@@"           # subword-nmt's continuation marker on the other pieces
UNK = "<unk>"
BATCH = 10_000        # lines encoded per tokenizers call


class SubwordBPE:
    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def learn(cls, lines: Iterable[str], size: int) -> "SubwordBPE":
        """BPE of about ``size`` pieces (word-final and inner pieces together)."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=END))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[UNK],
                                      end_of_word_suffix=END, show_progress=False)
        tok.train_from_iterator(lines, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "SubwordBPE":
        from tokenizers import Tokenizer
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:      # tokenizers raises its own exception types
            raise UserError(f"{path} is not a subword BPE codes file ({exc})")

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    def apply(self, lines: list[str]) -> list[str]:
        """Each line's words as pieces, ``@@`` after every piece but a word's last."""
        out = []
        for s in range(0, len(lines), BATCH):
            for enc in self.tok.encode_batch(lines[s:s + BATCH]):
                pieces = []
                for t in enc.tokens:
                    if t == UNK:
                        pieces.append(UNK)
                    elif t.endswith(END):
                        pieces.append(t[:-len(END)])
                    else:
                        pieces.append(t + MARK)
                out.append(" ".join(pieces))
        return out
