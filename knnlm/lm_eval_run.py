"""`knnlm lm-eval`: lm-evaluation-harness tasks run with the LM and the kNN-LM side by side.

    knnlm lm-eval --model-args pretrained=runs/hf/model,dstore=runs/hf/dstore \\
        --tasks knnlm_rolling,knnlm_cloze --include-path runs/hf/tasks --out runs/hf/lm_eval
    knnlm lm-eval --make-tasks runs/hf/tasks --corpus runs/demo/corpus   # local tasks

One model is loaded (the ``knnlm`` harness model, :mod:`knnlm.harness`; ``--model-args``
as lm-eval's ``--model_args``); each task runs twice, with the LM alone (λ 0) and with the
kNN-LM (the λ, T and k given, else the index's tuned settings), and ``--out`` gets
``table.md`` (per task and metric: LM, kNN-LM, difference) and ``results.json`` (both of
lm-eval's result dicts). Tasks come from lm-eval's registry or ``--include-path``
(YAML task definitions); offline, their data must be local or in the HF cache.

``--make-tasks DIR --corpus CORPUS_DIR`` writes two local tasks made from a corpus' test
split (``knnlm data fetch``'s ``test.txt``): ``knnlm_rolling`` (rolling perplexity over its
paragraphs: word and byte perplexity, bits per byte) and ``knnlm_cloze`` (the last word of
a line among four: accuracy), YAML next to their JSON lines.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .guard import check_output, output_lock
from .io import read_text, write_json_atomic
from .util import UserError, flag

LINES_PER_DOC = 20       # knnlm_rolling: a paragraph of this many lines per document
CLOZE_ITEMS = 200        # knnlm_cloze: items drawn from the test split's lines


@dataclass
class LmEvalConfig:
    model_args: str | None = flag(None, "the harness model's arguments, as lm-eval's "
                                  "--model_args: pretrained=MODEL,dstore=DSTORE[,lmbda=..,"
                                  "knn_temp=..,k=..,probe=..,data=DATA_BIN,...]",
                                  aliases=("--model_args",))
    tasks: str | None = flag(None, "comma-separated lm-eval task names")
    include_path: str | None = flag(None, "a directory of YAML task definitions",
                                    aliases=("--include_path",))
    out: str | None = flag(None, "output directory (table.md, results.json)",
                           aliases=("--output_path",))
    limit: float | None = flag(None, "at most this many documents per task (a fraction if < 1)")
    num_fewshot: int | None = flag(None, "few-shot examples per prompt (the task's default)",
                                   aliases=("--num_fewshot",))
    use_cache: str | None = flag(None, "lm-eval's request cache (a path prefix): a rerun "
                                 "answers the requests it holds", aliases=("--use_cache",))
    seed: int = flag(1234, "the seed of lm-eval's sampling of few-shot examples")
    make_tasks: str | None = flag(None, "instead of evaluating: write the local tasks "
                                  "knnlm_rolling and knnlm_cloze to this directory")
    corpus: str | None = flag(None, "--make-tasks: a corpus directory (its test.txt)")
    quiet: bool = flag(False, "no progress bars")

    def __post_init__(self):
        if self.make_tasks:
            if not self.corpus:
                raise UserError("--make-tasks needs --corpus DIR (its test.txt)")
            check_output(self.make_tasks, "dir", "--make-tasks")
            return
        if not (self.model_args and self.tasks and self.out):
            raise UserError("give --model-args, --tasks and --out (or --make-tasks DIR)")
        check_output(self.out, "dir", "--out")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be > 0, got {self.limit}")


def make_tasks(corpus: str | Path, out: str | Path) -> dict:
    """The local tasks knnlm_rolling and knnlm_cloze from ``corpus``/test.txt."""
    src = Path(corpus) / "test.txt"
    if not src.is_file():
        raise UserError(f"--corpus {corpus}: no test.txt (knnlm data fetch writes one)")
    lines = [line.rstrip() for line in read_text(src, "--corpus").splitlines()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(0, len(lines), LINES_PER_DOC):
        doc = "\n".join(lines[i:i + LINES_PER_DOC]).strip()
        if doc:
            docs.append(dict(text=doc))
    words = sorted({w for line in lines for w in line.split() if w.isalpha()})
    rng = random.Random(0)
    candidates = [line for line in lines if len(line.split()) >= 4 and
                  re.fullmatch(r"[A-Za-z]+", line.split()[-1].strip(".,;:!?'"))]
    items = []
    for line in rng.sample(candidates, min(CLOZE_ITEMS, len(candidates))):
        head, last = line.rsplit(" ", 1)
        word = last.strip(".,;:!?'")
        others = rng.sample([w for w in words if w != word], 3)
        choices = [" " + w for w in [word, *others]]
        rng.shuffle(choices)
        items.append(dict(context=head, choices=choices, label=choices.index(" " + word)))
    if not docs or not items:
        raise UserError(f"{src} is too short to make the tasks")
    for name, rows in (("rolling", docs), ("cloze", items)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
              f"{json.dumps(str((out / '{}.jsonl').resolve()))}\ntest_split: test\n")
    (out / "knnlm_rolling.yaml").write_text(
        "task: knnlm_rolling\n" + common.replace("{}", "rolling") +
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    (out / "knnlm_cloze.yaml").write_text(
        "task: knnlm_cloze\n" + common.replace("{}", "cloze") +
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    print(f"wrote {out}: knnlm_rolling ({len(docs):,} documents), knnlm_cloze "
          f"({len(items):,} items) from {src}")
    return dict(rolling=len(docs), cloze=len(items))


def table(lm: dict, knn: dict) -> list[dict]:
    """Per task and metric: the LM's value, the kNN-LM's, the difference."""
    rows = []
    for task in sorted(knn["results"]):
        for metric, value in knn["results"][task].items():
            name = metric.split(",")[0]
            if not isinstance(value, (int, float)) or "stderr" in name or \
                    name in ("alias", "sample_len"):
                continue
            base = lm["results"].get(task, {}).get(metric)
            rows.append(dict(task=task, metric=name, lm=base, knnlm=value,
                             diff=None if base is None else value - base))
    return rows


def markdown(rows: list[dict], settings: dict) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"kNN-LM: λ {settings['lmbda']:g}, T {settings['knn_temp']:g}, k {settings['k']}"
             f" ({'tuned' if settings.get('tuned_file') else 'given or default'})", "",
             "| task | metric | LM | kNN-LM | difference |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['metric']} | {fmt(r['lm'])} | {fmt(r['knnlm'])} | "
              f"{fmt(r['diff'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(cfg: LmEvalConfig) -> dict:
    if cfg.make_tasks:
        with output_lock(cfg.make_tasks, "dir", "tasks"):
            return make_tasks(cfg.corpus, cfg.make_tasks)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import simple_parse_args_string
    except ImportError:
        raise UserError("knnlm lm-eval needs lm-eval: pip install -e '.[eval]'")
    from .harness import KNNLMHarness
    args = simple_parse_args_string(cfg.model_args)
    model = KNNLMHarness(**args, quiet=True)
    manager = TaskManager(include_path=cfg.include_path)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)} (lm-eval's registry and "
                        f"--include-path {cfg.include_path})")
    runs = {}
    with output_lock(cfg.out, "dir", "lm-eval results"):
        for name, lm_only in (("lm", True), ("knnlm", False)):
            with model.lm_only(lm_only):
                runs[name] = lm_eval.simple_evaluate(
                    model=model, tasks=tasks, task_manager=manager, limit=cfg.limit,
                    num_fewshot=cfg.num_fewshot, random_seed=cfg.seed,
                    numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                    fewshot_random_seed=cfg.seed, log_samples=False,
                    use_cache=f"{cfg.use_cache}_{name}" if cfg.use_cache else None)
        rows = table(runs["lm"], runs["knnlm"])
        out = Path(cfg.out)
        text = markdown(rows, model.settings)
        (out / "table.md").write_text(text)
        write_json_atomic(out / "results.json", dict(
            table=rows, settings=model.settings,
            lm={k: runs["lm"][k] for k in ("results", "versions", "n-shot") if k in runs["lm"]},
            knnlm={k: runs["knnlm"][k] for k in ("results", "versions", "n-shot")
                   if k in runs["knnlm"]}))
    print(text, end="")
    return dict(table=rows, settings=model.settings)
