"""What `eval-lm` reports: perplexities from summed log-probs, the printed summary, and the
results JSON's record of the datastore (shared with `tune`)."""
from __future__ import annotations

import math

LN2 = math.log(2)


def perplexities(nll_sum: float, n_tokens: int, n_words: int) -> dict:
    """Loss (base 2) and perplexity per token and per word from a summed NLL (nats)."""
    out = dict(tokens=n_tokens, words=n_words, nll_sum=nll_sum)
    out["loss"] = nll_sum / max(1, n_tokens) / LN2
    out["ppl"] = 2 ** out["loss"]
    out["word_ppl"] = math.exp(nll_sum / n_words) if n_words else float("nan")
    return out


def datastore_record(ds) -> dict:
    """What the results JSON says of the datastore: its size and fingerprint, and how it
    was pruned or reduced (the search-saving methods that live in the datastore)."""
    m = ds.meta
    return dict(path=str(ds.path), size=ds.size, dim=ds.dim, fingerprint=ds.fingerprint,
                pruned=m.get("pruned"), projection=m.get("projection"), subset=m.get("subset"))


def format_results(res: dict) -> str:
    line = (f"{res['subset']}: {res['tokens']:,} tokens, {res['words']:,} words | "
            f"loss (base 2) {res['loss']:.4f} | ppl {res['ppl']:.2f} per token, "
            f"{res['word_ppl']:.2f} per word | {res['tokens_per_second']:,.0f} tok/s")
    if "knn" not in res:
        return line
    k, m = res["knn"], res["interpolated"]
    return "\n".join([
        f"{res['subset']}: {res['tokens']:,} tokens, {res['words']:,} words, "
        f"{res['tokens_per_second']:,.0f} tok/s",
        f"  LM only        ppl {res['ppl']:10.2f} per token {res['word_ppl']:12.2f} per word",
        f"  kNN only       ppl {k['ppl']:10.2f} per token {k['word_ppl']:12.2f} per word"
        + (f"  ({k['no_match_tokens']:,} tokens without a matching neighbour)"
           if k["no_match_tokens"] else ""),
        f"  kNN-LM         ppl {m['ppl']:10.2f} per token {m['word_ppl']:12.2f} per word"
        f"  (lambda {m['lmbda']}, T {m['knn_temp']}, k {m['k']}"
        + (", tuned" if (m.get("settings") or {}).get("tuned_file") else "") + ")",
        f"  score mode     {m['score_mode']['name']}: {m['score_mode']['description']}"]
        + _efficiency_line(m.get("efficiency")))


def _efficiency_line(eff: dict | None) -> list[str]:
    if not eff:
        return []
    how = (f"min-knns {eff['min_knns']}, max-knns {eff['max_knns']}" if eff["method"] == "retomaton"
           else f"λ̂ >= {eff['threshold']:.4f}" + (", λ̂ as λ" if eff["gate_lambda"] else ""))
    return [f"  {eff['method']:<14} {eff['searches']:,} searches for {eff['steps']:,} tokens: "
            f"{100 * eff['searches_saved']:.1f}% saved ({how})"]
