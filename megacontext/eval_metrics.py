"""Numbers MegaContext evaluation reports: gap closed, recall accuracy by distance, training curves on fair axes,
and the telemetry targets table.

- gap closed = (truncation - method) / (truncation - full): 0 = no better than dropping the history, 1 = as good
  as attending to all of it. Defined only where full attention runs and truncation is measurably worse.
- gain over truncation: per document, truncation's mean loss on the scored tokens minus the method's (positive =
  better), averaged over documents with its standard error. The pairing removes most of the document-to-document
  spread, so differences of a few thousandths of a nat can be told from noise where the raw means cannot.
- gists' content gain: per document, `mc_foreign`'s mean loss minus `mc_recency`'s (same cut, same raw tokens,
  gists from another document vs the document's own), averaged with its standard error; positive = the gists say
  something about the history that the GPT uses, beyond standing in for it. Reported on the `mc_recency` row;
- gist spread (per level): the share of the gists' mean square that varies between them over every document's
  tree (see `megacontext.mc_metrics.gist_spread`), for the checkpoint's gists (`mc_recency` row) and mean-pooled
  ones (`mc_mean` row); near 0 every gist is the same vector;
- recall: a case counts when every answer token is the greedy choice; accuracy is grouped by the distance of the
  asked-for fact from the end, in multiples of the model's window.
- training curves: `--loss-log` JSON lines (`step`, `loss`, `dt`, optional `tokens` / `flops` / `mc/...`) turned
  into loss against tokens processed, FLOPs and wall-clock, the axes on which MC and vanilla runs compare fairly
  (an MC step does extra work, so loss per step flatters neither).
"""

import json
import math

import numpy as np
import torch

from megacontext.mc_metrics import gist_spread

GAP_EPS = 1e-3  # nats: below this truncation and full attention are indistinguishable and the gap is undefined
DISTANCE_EDGES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, math.inf)  # in windows


def gap_closed(truncation: float | None, method: float | None, full: float | None) -> float | None:
    """(truncation - method) / (truncation - full), or None where it is undefined."""
    if truncation is None or method is None or full is None or truncation - full < GAP_EPS:
        return None
    return (truncation - method) / (truncation - full)


def summarize_history(results: dict, skipped: dict) -> dict:
    """{method: {loss, token_acc, wc_length, ...}} for one history length from MethodResults (or skip reasons)."""
    out = {}
    for name, r in results.items():
        row = {"loss": float(r.losses.mean()), "token_acc": float(r.correct.float().mean()),
               "wc_length": float(np.mean(r.wc_lengths)), "docs": int(r.losses.shape[0])}
        if r.swap_rates:
            row["swap_rate"] = float(np.mean(r.swap_rates))
        if r.expansions:
            row["expansions_per_doc"] = r.expansions / r.losses.shape[0]
        out[name] = row
    for name, reason in skipped.items():
        out[name] = {"skipped": reason}
    trunc = out.get("truncation", {}).get("loss")
    full = out.get("full", {}).get("loss")
    for row in out.values():
        if "loss" in row:
            row["gap_closed"] = gap_closed(trunc, row["loss"], full)
    if "truncation" in results:
        for name, r in results.items():
            if name != "truncation":
                out[name].update(paired_gain(results["truncation"].losses, r.losses))
    if "mc_recency" in results and "mc_foreign" in results:
        gain = paired_gain(results["mc_foreign"].losses, results["mc_recency"].losses)
        out["mc_recency"].update(content_gain=gain["gain_vs_truncation"], content_gain_se=gain["gain_vs_truncation_se"])
    return out


def tree_gist_spreads(trees) -> list[float]:
    """Per level 1..L, the spread of every gist of every tree (`gist_spread`: 0 = all the same vector)."""
    return [gist_spread(torch.cat([t.store.get_gists(level, np.arange(t.num_nodes(level))) for t in trees]))
            for level in range(1, trees[0].max_level + 1)]


def paired_gain(baseline_losses, method_losses) -> dict:
    """{gain_vs_truncation, gain_vs_truncation_se} from per-token losses Float[B, E] of the same documents and
    tokens: the mean over documents of (baseline - method), and its standard error (None for one document)."""
    if baseline_losses.shape != method_losses.shape:
        raise ValueError(f"paired losses must score the same tokens: {tuple(baseline_losses.shape)} vs "
                         f"{tuple(method_losses.shape)}")
    diff = (baseline_losses.double().mean(dim=1) - method_losses.double().mean(dim=1)).numpy()
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else None
    return {"gain_vs_truncation": float(diff.mean()), "gain_vs_truncation_se": se}


def distance_bin(distance: int, window: int) -> str:
    """Label of the distance bin, e.g. '1-2x' for a fact 1 to 2 windows from the end."""
    d = distance / window
    for lo, hi in zip(DISTANCE_EDGES[:-1], DISTANCE_EDGES[1:]):
        if lo <= d < hi:
            return f"{lo:g}-{hi:g}x" if math.isfinite(hi) else f">{lo:g}x"
    raise AssertionError(f"distance {distance} not binned")


def recall_table(records: list[dict], window: int) -> dict:
    """records: {method, kind, distance, recalled, answer_loss} -> {kind: {bin: {method: (accuracy, count, mean
    answer loss in nats)}}} in bin order. The answer loss still moves when accuracy is stuck at 0 or 1."""
    order = {distance_bin(int(lo * window), window): i for i, lo in enumerate(DISTANCE_EDGES[:-1])}
    table: dict = {}
    for rec in records:
        cell = table.setdefault(rec["kind"], {}).setdefault(distance_bin(rec["distance"], window), {})
        hits, n, loss = cell.get(rec["method"], (0, 0, 0.0))
        cell[rec["method"]] = (hits + int(rec["recalled"]), n + 1, loss + rec.get("answer_loss", float("nan")))
    return {kind: {b: {m: (h / n, n, s / n) for m, (h, n, s) in bins[b].items()} for b in sorted(bins, key=order.get)}
            for kind, bins in table.items()}


# ---------------------------------------------------------------------- training logs
def read_loss_log(path: str) -> list[dict]:
    """The JSON lines of a training run's --loss-log; a bad line is named."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg}); is this a --loss-log file?") from None
    return records


def training_curve(records: list[dict], tokens_per_step: int, flops_per_token: float) -> dict:
    """{step, loss, tokens, flops, seconds} arrays over the records with a training loss. Records' own
    `tokens` / `flops` win over the derived ones (step x tokens_per_step, tokens x flops_per_token)."""
    rows = [r for r in records if "loss" in r and "step" in r]
    if not rows:
        return {"step": [], "loss": [], "tokens": [], "flops": [], "seconds": []}
    step = np.array([r["step"] for r in rows], dtype=np.float64)
    tokens = np.array([r.get("tokens", s * tokens_per_step) for r, s in zip(rows, step)], dtype=np.float64)
    flops = np.array([r.get("flops", t * flops_per_token) for r, t in zip(rows, tokens)], dtype=np.float64)
    seconds = np.cumsum([r.get("dt", 0.0) for r in rows])
    return {"step": step.tolist(), "loss": [float(r["loss"]) for r in rows], "tokens": tokens.tolist(),
            "flops": flops.tolist(), "seconds": seconds.tolist()}


def mean_of(records: list[dict], key: str, last: int = 50) -> float | None:
    """Mean of `key` over the last `last` records that carry it (the end of training), or None."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))][-last:]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------- telemetry targets
TELEMETRY_TARGETS = (
    # (metric, target, where the measured value comes from)
    ("ΔNLL@H", "≤ 0.10", "eval: mc_lens loss − full attention loss at the longest history that fits the window"),
    ("Swap rate", "0.05–0.20", "eval: share of WC entries replaced per LensNet refocus step"),
    ("Residency", "90–100 %", "eval: WC entries used ÷ budget under mc_lens"),
    ("mc/token_loss", "trends down, ≤ baseline loss", "training log (last 50 steps)"),
    ("mc/variants_total", "= variants × batch + one baseline per micro-batch", "training log (last 50 steps)"),
    ("mc/adv_delta_mean", "≈ 0", "training log (last 50 steps)"),
    ("mc/adv_delta_p95", "low", "training log (last 50 steps)"),
    ("mc/preference_corr_mean", "close to −1", "training log (last 50 steps)"),
    ("mc/lens_loss", "→ 0 (< 0.1)", "training log (last 50 steps)"),
)


def telemetry_rows(histories: dict, window: int, budget: int, mc_log: list[dict] | None) -> list[tuple[str, str, str, str]]:
    """(metric, target, measured, source) for the targets table; 'not measured' says what was missing."""
    fitting = [h for h in histories if h <= window and "loss" in histories[h].get("full", {})
               and "loss" in histories[h].get("mc_lens", {})]
    lens = [histories[h]["mc_lens"] for h in histories if "loss" in histories[h].get("mc_lens", {})]
    measured: dict[str, str] = {}
    if fitting:
        h = max(fitting)
        measured["ΔNLL@H"] = f"{histories[h]['mc_lens']['loss'] - histories[h]['full']['loss']:+.3f} (H={h})"
    swaps = [r["swap_rate"] for r in lens if "swap_rate" in r]
    if swaps:
        measured["Swap rate"] = f"{np.mean(swaps):.3f}"
    if lens:
        measured["Residency"] = f"{100 * np.mean([r['wc_length'] for r in lens]) / budget:.1f} %"
    for name, _, _ in TELEMETRY_TARGETS[3:]:
        value = mean_of(mc_log, name) if mc_log else None
        if value is not None:
            measured[name] = f"{value:.4g}"
    reason = "not measured (no MC --loss-log given)" if not mc_log else "not in the MC training log"
    return [(name, target, measured.get(name, reason if name.startswith("mc/") else "not measured"), source)
            for name, target, source in TELEMETRY_TARGETS]
