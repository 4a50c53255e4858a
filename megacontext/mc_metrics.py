"""Per-step MegaContext training metrics: accumulated over micro-batches, averaged over processes.

Every key of `metric_names(max_level)` is present on every process in the same order, so one all-reduce of a
(sum, count) vector gives the global-batch value of each; a key with no data this step is left out of the result.

Definitions (all losses in nats per target token):
- `mc/token_loss`: the variants' next-token loss over all their raw entries (what the GPT trains on);
- `mc/tail_loss`, `mc/trunc_loss`: mean loss on the shared raw tail of the variants / of the truncation
  baseline (same target tokens, same WC length), over the rows whose baseline was measured (in training the
  first row of each micro-batch, in validation every row). A row's shared raw tail is the longest run of final
  tokens that is raw in every variant of the row (at least the recent tokens, `mc/shared_tail_tokens` on average);
- `mc/full_tail_loss` (validation only): the same tail's loss with the whole row in context, as vanilla attention
  over `max_seq_len` sees it. Below `mc/trunc_loss`, the model uses the earlier tokens when it has them raw;
  above it (a briefly trained model), many raw tokens hurt it, which a few gists need not do;
- `mc/lod{k}_loss`: `mc/tail_loss` of the variants whose deepest allowed gist level is k;
- `mc/staircase_lod{k}_loss`: the same for the plain recency staircase alone (no random swap): the cut the
  allocator keeps near when LensNet agrees with recency, so the one to hold against `mc/trunc_loss`; the swapped
  variants exist to give LensNet labels and are worse by design;
- `mc/staircase_lod{k}_gain`, `..._gain_se`: per row, truncation tail loss − staircase tail loss (> 0: the gists
  beat the raw tokens they displace), its mean over rows and the standard error of that mean (paired, so
  the difference between rows' difficulty cancels);
- `mc/adv_delta_mean|p95`: advantage of a variant over the baseline, trunc tail loss − variant tail loss
  (> 0: the gists carry information the truncated window lacks), mean and 95th percentile over variants;
- `mc/preference_corr_mean`: Pearson correlation, over every same-row variant pair of the step (all micro-batches
  and processes pooled), between LensNet's predicted utility difference (−Δ predicted loss) and the measured ΔNLL.
  −1: LensNet ranks variants exactly as the measured losses do; 0: no relation; > 0: backwards;
- `mc/lens_loss`: the Bradley–Terry fit (0 = predicted and measured differences agree);
- `mc/pair_delta_rms`: RMS of the measured tail-loss differences between variants of a row (the scale
  `--mc_lens_temperature` should match; normalised units under `--mc_lens_adv_norm_beta`);
- `mc/variants_total`: WCs run through the GPT this step (variants + measured baselines, all processes);
- `mc/swap_rate`, `mc/residency`: share of a WC's entries the allocator replaces when it refocuses a sampled
  variant with LensNet's scores, and the share it keeps (1 − swap rate);
- `mc/gist_spread_lod{k}`: share of the level-k gists' mean square that varies between gists,
  mean ||g - mean(g)||² / mean ||g||² over the gists built this step. Mean-pooled token embeddings give about 0.6
  at level 1 (8-token blocks); near 0 every gist is the same vector whatever it covers, a placeholder that tells
  the GPT nothing about the history (GistNet has collapsed);
- `mc/gist_content_loss`: GistNet's content term (gist_content.py), mean token cross-entropy of each built gist
  against the tokens it covers, in nats (recorded whatever its weight, so an unweighted run shows it too);
- `mc/time_controller_ms`: wall ms of the controller's own work (tree build, sampling, positions, LensNet,
  allocator) per step, excluding the GPT forwards; `mc/target_wc_length`: the annealed variant length.
"""

import math

import torch
import torch.distributed as dist

TOTALS = ("mc/variants_total",)  # per step, over all processes
PER_PROCESS = ("mc/time_controller_ms",)  # per step, averaged over processes


def metric_names(max_level: int) -> list[str]:
    return (["mc/token_loss", "mc/tail_loss", "mc/trunc_loss", "mc/full_tail_loss"]
            + [f"mc/lod{k}_loss" for k in range(1, max_level + 1)]
            + [f"mc/staircase_lod{k}_loss" for k in range(1, max_level + 1)]
            + [f"mc/staircase_lod{k}_gain" for k in range(1, max_level + 1)]
            + [f"mc/gist_spread_lod{k}" for k in range(1, max_level + 1)] + ["mc/gist_content_loss"]
            + ["mc/lens_loss", "mc/adv_delta_mean", "mc/adv_delta_p95", "mc/preference_corr_mean",
               "mc/pair_delta_rms", "mc/swap_rate", "mc/residency", "mc/target_wc_length", "mc/shared_tail_tokens",
               *TOTALS, *PER_PROCESS])


def gist_spread(gists: torch.Tensor) -> float:
    """Float[n, D] gists (NaN rows: not built, skipped) -> the share of their mean square that varies between them
    (0: all the same vector). NaN with fewer than two gists."""
    g = gists.detach().float()
    g = g[torch.isfinite(g).all(dim=1)]
    if g.shape[0] < 2:
        return float("nan")
    total = g.square().sum(dim=1).mean()
    return float((g - g.mean(dim=0)).square().sum(dim=1).mean() / total.clamp(min=1e-30))


def with_standard_error(name: str) -> bool:
    """Metrics recorded one value per row, whose collected value comes with the standard error of its mean."""
    return name.endswith("_gain")


class StepMetrics:
    def __init__(self, max_level: int):
        self.names = metric_names(max_level)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._sums = torch.zeros(len(self.names), 3, dtype=torch.float64)  # (sum, count, sum of squares)
        self._pairs = torch.zeros(6, dtype=torch.float64)  # n, Σx, Σy, Σxy, Σx², Σy² of (predicted, measured) Δ

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        """Record a value (NaN is skipped: e.g. a correlation undefined for an untrained, constant LensNet)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        i = self._index[name]
        self._sums[i, 0] += float(value) * weight
        self._sums[i, 1] += weight
        self._sums[i, 2] += float(value) ** 2 * weight

    def add_values(self, name: str, values: torch.Tensor) -> None:
        """Record one value per item (e.g. per row), so the mean's standard error can be computed."""
        v = values.detach().double().flatten().cpu()
        if v.numel():
            self._sums[self._index[name]] += torch.stack([v.sum(), torch.tensor(float(v.numel()), dtype=torch.float64),
                                                          v.square().sum()])

    def add_pairs(self, predicted: torch.Tensor, measured: torch.Tensor) -> None:
        """Pool (predicted, measured) loss differences of variant pairs for `mc/preference_corr_mean`."""
        x, y = predicted.detach().double().flatten().cpu(), measured.detach().double().flatten().cpu()
        self._pairs += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), y.sum(),
                                    (x * y).sum(), (x * x).sum(), (y * y).sum()])

    def collect(self, ranks: int = 1) -> dict[str, float]:
        """The step's values (global over processes), then reset: totals, per-process sums or means."""
        sums = torch.cat([self._sums.flatten(), self._pairs])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
            ranks = dist.get_world_size()
        sums, pairs = sums[:-6].view(-1, 3), sums[-6:]
        self._sums.zero_()
        self._pairs.zero_()
        out = {}
        for name, (total, count, squares) in zip(self.names, sums.tolist()):
            if count == 0:
                continue
            out[name] = total if name in TOTALS else total / ranks if name in PER_PROCESS else total / count
            if with_standard_error(name) and count > 1:
                var = max(squares - total * total / count, 0.0) / (count - 1)
                out[name + "_se"] = math.sqrt(var / count)
        corr = _pearson(*pairs.tolist())
        if not math.isnan(corr):
            out["mc/preference_corr_mean"] = -corr  # utility (−Δ predicted loss) against measured ΔNLL
        return out


def _pearson(n, sx, sy, sxy, sxx, syy) -> float:
    if n < 2:
        return float("nan")
    var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
    if var_x <= 1e-30 or var_y <= 1e-30:  # a constant side, e.g. an untrained LensNet scoring everything 0
        return float("nan")
    return (n * sxy - sx * sy) / math.sqrt(var_x * var_y)


def percentile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return float("nan")
    return float(torch.quantile(values.detach().double().flatten(), q))


def progress_note(metrics: dict, prefix: str = "mc/") -> str:
    """The MC part of a progress or eval line ("" without MC metrics): variant loss, tail loss vs the truncation
    baseline (in validation also the whole row's, each plain staircase's and the gists' spread per level),
    preference correlation, controller ms."""
    if f"{prefix}token_loss" not in metrics:
        return ""
    line = f" | mc: {metrics[prefix + 'token_loss']:.4f}"
    if prefix + "tail_loss" in metrics:
        line += f" tail {metrics[prefix + 'tail_loss']:.4f} vs trunc {metrics[prefix + 'trunc_loss']:.4f}"
    if prefix + "full_tail_loss" in metrics:  # validation: the whole row, and the staircases per level of detail
        line += f" (full row {metrics[prefix + 'full_tail_loss']:.4f})"
        stairs = sorted(k for k in metrics if k.startswith(prefix + "staircase_lod") and k.endswith("_loss"))
        if stairs:
            lods = "/".join(k[len(prefix + "staircase_"):-len("_loss")] for k in stairs)
            line += f" | staircase {lods} " + "/".join(f"{metrics[k]:.4f}" for k in stairs)
            gains = [(metrics.get(k[:-len("loss")] + "gain"), metrics.get(k[:-len("loss")] + "gain_se")) for k in stairs]
            if all(g is not None and se is not None for g, se in gains):
                line += " (gain " + "/".join(f"{g:+.4f}±{se:.4f}" for g, se in gains) + ")"
        spreads = sorted(k for k in metrics if k.startswith(prefix + "gist_spread_lod"))
        if spreads:  # near 0: every gist of a level is the same vector (collapsed GistNet)
            line += " | gist spread " + "/".join(f"{metrics[k]:.3f}" for k in spreads)
    corr = metrics.get(prefix + "preference_corr_mean")
    line += "" if corr is None else f" | pref corr {corr:+.2f}"
    return line + f" | ctrl: {metrics[prefix + 'time_controller_ms']:.0f}ms"
