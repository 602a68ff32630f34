"""Markdown tables and plots of `knnlm analyze` results (perplexities per token)."""
from __future__ import annotations

import html
import re
from pathlib import Path

from ..knn.sweep import pyplot

TITLES = dict(
    representation="Representation x similarity (FAISS mask and score)",
    retrieval="Approximate vs exact retrieval (att keys, L2)",
    temperature="Temperature: best-λ perplexity per T and retrieval mode",
    size="Datastore size (seeded random subsets, att keys, L2)",
    overlap="Approximate vs exact neighbour sets (att keys, L2)",
    tokens="Where retrieval helps: by the target's training frequency, and by token",
    parametric="Parametric alternatives vs the kNN-LM",
    overfit="Overfitting: the base LM trained past convergence vs the kNN-LM",
    efficiency="Efficiency: fast retrieval and searching less, against the reference kNN-LM on the same tokens",
)


def _f(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _settings_table(rows: list[dict], label_cols: list[tuple[str, str]]) -> list[str]:
    label_cols = label_cols + [("score mode", "score_mode")]
    head = [h for h, _ in label_cols] + ["kNN-only ppl (T=1)", "kNN-LM ppl (T=1, best λ)",
                                         "λ", "best T", "kNN-LM ppl (best T, λ)", "λ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(label_cols) + "---:|" * 6]
    for r in rows:
        t1, b = r.get("t1") or {}, r["best"]
        cells = [str(r.get(k, "")) for _, k in label_cols] + [
            _f(t1.get("knn_ppl")), _f(t1.get("ppl")), f"{t1.get('lmbda', float('nan')):g}",
            f"{b['temp']:g}", _f(b["ppl"]), f"{b['lmbda']:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _commands(rows: list[dict], key: str) -> list[str]:
    out = ["", "Commands:", ""]
    for r in rows:
        out.append(f"- {r[key]}:")
        out += [f"  - `{c}`" for c in r["commands"]]
    return out


def part_markdown(name: str, res: dict) -> str:
    lines = [f"## {TITLES[name]}", ""]
    if name == "representation":
        rows = res["rows"]
        lines.append(f"LM only: {_f(rows[0]['lm_ppl'])}")
        lines.append("")
        lines += _settings_table(rows, [("keys", "keytype"), ("similarity", "metric")])
        for r in rows:
            r["setting"] = f"{r['keytype']} / {r['metric']}"
        lines += _commands(rows, "setting")
    elif name == "retrieval":
        lines += _settings_table(res["rows"], [("retrieval", "mode")])
        lines += _commands(res["rows"], "mode")
    elif name == "temperature":
        curves = res["curves"]
        temps = curves[0]["temps"]
        lines.append("| T | " + " | ".join(c["mode"] for c in curves) + " |")
        lines.append("|---:|" + "---:|" * len(curves))
        for i, t in enumerate(temps):
            lines.append(f"| {t:g} | " + " | ".join(_f(c["ppl"][i]) for c in curves) + " |")
        lines += ["", "Commands:", ""] + [f"- {c['mode']}: `{c['command']}`" for c in curves]
    elif name == "size":
        for r in res["rows"]:
            r["label"] = f"{r['fraction']:g} ({r['keys']:,} keys, {r['factory']})"
        lines += _settings_table(res["rows"], [("fraction of the datastore", "label")])
        lines += _commands(res["rows"], "label")
    elif name == "overlap":
        lines += ["| search | k | overlap with exact top-k | mean exact dist: approx | "
                  "exact | approx − exact | FAISS − exact dist (same neighbours) | "
                  "mean abs FAISS error |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            lines.append(f"| {r['search']} | {r['k']} | {r['overlap']:.3f} | "
                         f"{_f(r['mean_exact_dist_approx'])} | {_f(r['mean_exact_dist_true'])} | "
                         f"{_f(r['approx_minus_true'])} | {_f(r['faiss_minus_exact'])} | "
                         f"{_f(r['abs_faiss_error'])} |")
        lines += ["", "Commands (the evals whose caches are compared):", ""]
        lines += [f"- `{c}`" for c in res["commands"]]
    elif name == "tokens":
        lines += [f"kNN-LM: att keys, L2, FAISS scores, T {res['temp']:g}, λ {res['lmbda']:g} "
                  f"(ppl {_f(res['lm_ppl'])} → {_f(res['knnlm_ppl'])}).", "",
                  "| target's count in the training data | tokens | share | LM ppl | kNN-LM ppl "
                  "| share of the gain |", "|---|---:|---:|---:|---:|---:|"]
        for r in res["buckets"]:
            lines.append(f"| {r['counts']} | {r['tokens']:,} | {r['share']:.3f} | {_f(r['lm_ppl'])} | "
                         f"{_f(r['knnlm_ppl'])} | {r['gain_share']:.3f} |")
        for key, title in (("gain", "largest total gain"), ("loss", "largest total loss")):
            lines += ["", f"Token types with the {title} (log-probability, summed over occurrences):",
                      "", "| token | occurrences | training count | total | per occurrence |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['text']!r} | {r['occurrences']:,} | {r['train_count']:,} | "
                      f"{r['gain']:+.2f} | {r['mean_gain']:+.3f} |" for r in res["top"][key]]
        lines += ["", "Commands:", ""] + [f"- `{c}`" for c in res["commands"]]
    elif name == "parametric":
        k = res["knnlm"]
        lines += ["| model | head | alone ppl | + base LM: ppl | λ | share of the kNN-LM gain |",
                  "|---|---|---:|---:|---:|---:|",
                  f"| base LM | softmax over ffn | {_f(res['base_ppl'])} | — | — | 0 |",
                  f"| kNN-LM (att, L2, T=1) | datastore | — | {_f(k['t1']['ppl'])} | "
                  f"{k['t1']['lmbda']:g} | — |",
                  f"| kNN-LM (att, L2, T={k['best']['temp']:g}) | datastore | — | "
                  f"{_f(k['best']['ppl'])} | {k['best']['lmbda']:g} | 1 |"]
        for r in res["rows"]:
            head = ", ".join(f"{a}={b}" for a, b in r["head"].items() if not _default_head(b))
            lines.append(f"| {r['name']} | {head or 'standard'} | {_f(r['alone_ppl'])} | "
                         f"{_f(r['interp_ppl'])} | {r['lmbda']:g} | {r['gain_recovered']:.2f} |")
        lines += _commands(res["rows"], "name")
        lines.append(f"- kNN-LM: `{k['command']}`")
    elif name == "overfit":
        k = res["knnlm"]["best"]
        lines += [f"Training perplexity over the first {res['train_tokens']:,} training tokens.", "",
                  "| model | updates | train ppl | eval ppl | + base LM: ppl | λ | "
                  "share of the kNN-LM gain |", "|---|---:|---:|---:|---:|---:|---:|",
                  f"| base LM | — | {_f(res['base_train_ppl'])} | {_f(res['base_ppl'])} | — | — | 0 |",
                  f"| kNN-LM (att, L2, T={k['temp']:g}) | — | — | — | {_f(k['ppl'])} | "
                  f"{k['lmbda']:g} | 1 |"]
        for r in res["rows"]:
            r["name"] = f"epoch {r['epoch']}"
            lines.append(f"| {r['name']} | {r['updates']:,} | {_f(r['train_ppl'])} | "
                         f"{_f(r['alone_ppl'])} | {_f(r['interp_ppl'])} | {r['lmbda']:g} | "
                         f"{r['gain_recovered']:.2f} |")
        lines += _commands(res["rows"], "name")
        lines += [f"- base LM: `{c}`" for c in res["commands"]]
        lines.append(f"- kNN-LM: `{res['knnlm']['command']}`")
    elif name == "efficiency":
        lm = res["lm_only"]
        lines += [f"λ {res['lmbda']:g}, T {res['temp']:g}, index {res['factory']} (the "
                  f"reference, exact scores; fast-scan: {res.get('fast_factory')}); the LM "
                  f"alone: {lm['tokens_per_second']:,.0f} tok/s, ppl {_f(lm['ppl'])} (the "
                  f"reference kNN-LM takes {res['plain_over_lm_time']:.1f}x its time). "
                  "Starred: the Pareto front (nothing is both faster and better).", "",
                  "| setting | tok/s | time / LM | ppl | tokens searched | speed-up | ppl change |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            star = " *" if r["name"] in res["pareto"] else ""
            lines.append(f"| {r['name']}{star} | {r['tokens_per_second']:,.0f} | "
                         f"{r['time_over_lm']:.2f}x | {_f(r['ppl'])} | {r['searched']:.0%} | "
                         f"{r['speedup']:.2f}x | {100 * r['ppl_increase']:+.1f}% |")
        lines += ["", "Commands (the shared kNN-LM point):", ""] + [f"- `{c}`" for c in res["commands"]]
    lines += ["", f"This part alone: `{res.get('command', '')}`", ""]
    return "\n".join(lines) + "\n"


def _default_head(value) -> bool:
    """A head field at its standard value (no extra rows, one component, ffn input)."""
    return value is None or value is False or value == "ffn" or (
        type(value) is int and value == 1)


def plots(out: Path, results: dict) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    made = []
    if "temperature" in results:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in results["temperature"]["curves"]:
            ax.plot(c["temps"], c["ppl"], marker="o", label=c["mode"])
        ax.set_xscale("log")
        ax.set_xlabel("kNN softmax temperature T")
        ax.set_ylabel("kNN-LM perplexity (best λ per T)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "temperature.png", dpi=120)
        made.append("temperature.png")
    if "size" in results:
        rows = results["size"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        keys = [r["keys"] for r in rows]
        if all(r.get("t1") for r in rows):
            ax.plot(keys, [r["t1"]["ppl"] for r in rows], marker="o", label="T = 1")
        ax.plot(keys, [r["best"]["ppl"] for r in rows], marker="s", label="best T")
        ax.axhline(rows[0]["lm_ppl"], color="gray", linestyle="--", label="LM only")
        ax.set_xscale("log")
        ax.set_xlabel("datastore keys")
        ax.set_ylabel("kNN-LM perplexity (best λ)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "size.png", dpi=120)
        made.append("size.png")
    plt.close("all")
    return made


def full_report(results: dict, config: dict, plot_files: list[str]) -> str:
    lines = ["# kNN-LM analysis", "",
             f"Model `{config['path']}`, datastore `{config['dstore_filename']}`, split "
             f"`{config['gen_subset']}`" + (f" (first {config['max_eval_tokens']:,} tokens)"
                                          if config["max_eval_tokens"] else "")
             + f", k {config['k']}, nprobe {config['probe']}. Perplexities are per token.", ""]
    for name, res in results.items():
        lines.append(part_markdown(name, res))
    lines += [f"![{p}]({p})" for p in plot_files]
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts))


def markdown_html(text: str) -> str:
    """The report's markdown (headings, paragraphs, lists, tables, images) as HTML; every
    character of the text escaped."""
    out, para, rows, items = [], [], [], []

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if rows:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows
                     if not set(r.replace("|", "").strip()) <= set("-: ")]
            head, body = cells[0], cells[1:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) +
                       "</tr>" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) +
                                         "</tr>" for r in body) + "</table>")
            rows.clear()
    for line in text.splitlines():
        img = re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip())
        if line.startswith("|"):
            if para or items:
                flush()
            rows.append(line)
            continue
        if rows:
            flush()
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = min(4, len(line) - len(line.lstrip("#")))
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif img:
            flush()
            out.append(f'<img alt="{html.escape(img.group(1))}" src="{html.escape(img.group(2))}">')
        elif line.lstrip().startswith("- "):
            if para:
                flush()
            items.append(line.lstrip()[2:])
        else:
            para.append(line.strip())
    flush()
    return "\n".join(out)


def html_report(markdown: str, spans: list[dict]) -> str:
    """report.html: the report, then links to the explorer pages of the spans (each with
    its file, kind, tokens and total gain)."""
    links = ""
    if spans:
        links = ("<h2>Explorer pages of the spans where the kNN-LM gains and loses most</h2><ul>"
                 + "".join(f'<li><a href="{html.escape(s["page"])}">{html.escape(s["kind"])}: '
                           f'tokens {s["start"]:,}–{s["end"]:,}</a>, total '
                           f'{s["gain"]:+.2f} nats: {html.escape(s["text"][:100])}…</li>'
                           for s in spans) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>kNN-LM analysis</title><style>"
            "body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:24px auto;"
            "padding:0 16px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid "
            "#ddd;padding:2px 6px;font-size:12px}img{max-width:100%}code{font-size:12px}"
            "</style></head><body>\n" + markdown_html(markdown) + links + "\n</body></html>\n")
