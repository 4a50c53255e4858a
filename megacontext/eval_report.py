"""Turn MegaContext evaluation results into markdown tables, PNG plots and a JSON file.

`results` (what `scripts.mc_eval` collects) holds: `config`, `histories` ({N: {method: row}}), `recall` (the
`recall_table` per source), `speed` (rows of `decode_cost`), `training` ({run: curve}) and `telemetry` rows.
Plots are written next to the JSON; markdown links them by file name relative to the report directory.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from megacontext.eval_methods import METHODS  # noqa: E402


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def loss_table(histories: dict, window: int) -> list[str]:
    methods = [m for m in METHODS if any(m in rows for rows in histories.values())]
    lines = ["| history (tokens) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for h in sorted(histories):
        cells = []
        for m in methods:
            row = histories[h].get(m, {})
            cells.append(_fmt(row.get("loss")) if "loss" in row else "skip")
        lines.append(f"| {h} ({h / window:g}× window) | " + " | ".join(cells) + " |")
    return lines


def gap_table(histories: dict) -> list[str]:
    fitting = [h for h in sorted(histories) if any(r.get("gap_closed") is not None for r in histories[h].values())]
    if not fitting:
        return ["Gap closed is undefined here: full attention does not run at these histories, or truncation is "
                "no worse than full attention (nothing to close)."]
    methods = [m for m in METHODS if m not in ("full", "truncation")]
    lines = ["| history | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for h in fitting:
        cells = []
        for m in methods:
            gap = histories[h].get(m, {}).get("gap_closed")
            cells.append("—" if gap is None else f"{100 * gap:.0f} %")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return lines


def gain_table(histories: dict) -> list[str]:
    """Each method's paired gain over truncation ± its standard error, per history (positive = better)."""
    methods = [m for m in METHODS if m != "truncation" and any("gain_vs_truncation" in r.get(m, {})
                                                               for r in histories.values())]
    if not methods:
        return ["No paired comparison: truncation did not run."]
    lines = ["| history | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for h in sorted(histories):
        cells = []
        for m in methods:
            row = histories[h].get(m, {})
            cells.append(format_gain(row) if "gain_vs_truncation" in row else "skip")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return lines


def format_gain(row: dict) -> str:
    """'+0.0123 ± 0.0045' (no ± with a single document)."""
    se = row["gain_vs_truncation_se"]
    return f"{row['gain_vs_truncation']:+.4f}" + ("" if se is None else f" ± {se:.4f}")


def gist_note(rows: dict) -> str:
    """What the gists of one history carry: 'gists: content gain over mc_foreign +0.0012 ± 0.0008; spread
    lod1/lod2 0.412/0.087 mean-pooled 0.869/0.502', or '' when neither was measured."""
    own, mean = rows.get("mc_recency", {}), rows.get("mc_mean", {})
    parts = []
    if "content_gain" in own:
        se = own["content_gain_se"]
        parts.append(f"content gain over mc_foreign {own['content_gain']:+.4f}"
                     + ("" if se is None else f" ± {se:.4f}"))
    spreads = [(label, row["gist_spread"]) for label, row in (("", own), ("mean-pooled ", mean))
               if "gist_spread" in row]
    if spreads:
        lods = "/".join(f"lod{k}" for k in range(1, len(spreads[0][1]) + 1))
        text = " ".join(f"{label}{'/'.join(_fmt(v) for v in values)}" for label, values in spreads)
        parts.append(f"spread {lods} {text}")
    return "gists: " + "; ".join(parts) if parts else ""


def gist_lines(histories: dict) -> list[str]:
    """Markdown lines with each history's `gist_note` (none when no history has one)."""
    notes = [(h, gist_note(histories[h])) for h in sorted(histories)]
    lines = [f"- history {h}: {note}" for h, note in notes if note]
    if not lines:
        return []
    return ["What the gists carry (content gain: `mc_foreign` loss − `mc_recency` loss, paired; spread: share of "
            "the gists' mean square that varies between them, 0 = one vector for all):", "", *lines, ""]


def recall_markdown(recall: dict) -> list[str]:
    lines = []
    for source, kinds in recall.items():
        for kind, bins in kinds.items():
            methods = [m for m in METHODS if any(m in cell for cell in bins.values())]
            lines += [f"Recall accuracy, {source} / {kind} (cases per cell in parentheses; then the mean loss of "
                      "the whole answer in nats):", "",
                      "| fact distance from end | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
            for b, cell in bins.items():
                row = [f"{100 * cell[m][0]:.0f} % ({cell[m][1]}) · {cell[m][2]:.2f}" if m in cell else "skip"
                       for m in methods]
                lines.append(f"| {b} | " + " | ".join(row) + " |")
            lines.append("")
    return lines or ["No recall cases were run."]


def speed_markdown(speed: list[dict]) -> list[str]:
    lines = ["| history | WC entries | MC tok/s | vanilla tok/s (last window) | MC forward ms | refocus ms | "
             "ingest µs/token | tree MiB | MC peak MiB | vanilla peak MiB | process RSS MiB |", "|---" * 11 + "|"]
    for r in speed:
        if "skipped" in r:
            lines.append(f"| {r['history']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        lines.append(f"| {r['history']} | {r['wc_length']} | {r['mc_tok_s']:.1f} | {r['vanilla_tok_s']:.1f} | "
                     f"{r['mc_forward_ms']:.2f} | {r['mc_refocus_ms']:.2f} | {r['mc_ingest_us_per_token']:.1f} | "
                     f"{r['tree_mib']:.3f} | {_fmt(r['mc_peak_mib'], 1)} | {_fmt(r['vanilla_peak_mib'], 1)} | "
                     f"{_fmt(r.get('rss_mib'), 0)} |")
    return lines


def telemetry_markdown(rows) -> list[str]:
    lines = ["| metric | target | measured | source |", "|---|---|---|---|"]
    lines += [f"| {m} | {t} | {v} | {s} |" for m, t, v, s in rows]
    return lines


# ---------------------------------------------------------------------- plots
def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_vs_history(histories: dict, path: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        pts = [(h, histories[h][m]["loss"]) for h in sorted(histories) if "loss" in histories[h].get(m, {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="history length (tokens)", ylabel="loss on the final tokens (nats)", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_recall(recall: dict, path: str) -> str:
    panels = [(src, kind, bins) for src, kinds in recall.items() for kind, bins in kinds.items()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for ax, (src, kind, bins) in zip(axes[0], panels):
        labels = list(bins)
        for m in METHODS:
            ys = [bins[b][m][0] * 100 if m in bins[b] else float("nan") for b in labels]
            if any(y == y for y in ys):
                ax.plot(range(len(labels)), ys, marker="o", label=m)
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set(xlabel="fact distance from the end (windows)", ylabel="recall accuracy (%)", title=f"{src}: {kind}",
               ylim=(-5, 105))
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_speed(speed: list[dict], path: str) -> str:
    rows = [r for r in speed if "skipped" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    h = [r["history"] for r in rows]
    a.plot(h, [r["mc_tok_s"] for r in rows], marker="o", label="MegaContext")
    a.plot(h, [r["vanilla_tok_s"] for r in rows], marker="o", label="vanilla (last window only)")
    a.set_xscale("log", base=2)
    a.set(xlabel="history (tokens)", ylabel="tokens / s (no KV cache)", title="generation speed")
    a.legend(fontsize=8)
    b.plot(h, [r["tree_mib"] for r in rows], marker="o", label="MC tree storage")
    if rows and rows[0].get("mc_peak_mib") is not None:
        b.plot(h, [r["mc_peak_mib"] for r in rows], marker="o", label="MC peak (CUDA)")
        b.plot(h, [r["vanilla_peak_mib"] for r in rows], marker="o", label="vanilla peak (CUDA)")
    b.set_xscale("log", base=2)
    b.set(xlabel="history (tokens)", ylabel="MiB", title="memory")
    b.legend(fontsize=8)
    return _save(fig, path)


def plot_training(curves: dict, out_dir: str) -> list[str]:
    """Three plots: training loss vs tokens processed, vs FLOPs, vs wall-clock seconds, one line per run."""
    paths = []
    for axis, label in (("tokens", "tokens processed"), ("flops", "training FLOPs"), ("seconds", "wall-clock (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in curves.items():
            if c["loss"]:
                ax.plot(c[axis], c["loss"], label=name)
        ax.set(xlabel=label, ylabel="training loss", title=f"loss vs {label}")
        ax.legend(fontsize=8)
        paths.append(_save(fig, os.path.join(out_dir, f"train_loss_vs_{axis}.png")))
    return paths


def write_json(results: dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    return path
