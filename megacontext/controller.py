"""MCController: MegaContext inside a training loop, behind the same small interface as a vanilla objective.

A training script builds one objective (`training_objective(...)`: `VanillaObjective` without --mc, `MCController`
with it) and then only calls it:

    loss, lm_loss = objective(x, y, step)     # backward `loss`; log `lm_loss` (the vanilla next-token loss)
    objective.optimizers                      # extra optimizers (with "initial_lr", so LR schedules apply)
    objective.parameters()                    # extra trainable parameters (gradient averaging)
    objective.clip_groups()                   # those parameters in groups, each clipped on its own
    objective.end_step()                      # once per optimizer step, after the backward passes
    objective.step_metrics()                  # dict for the progress line / W&B / loss log (all processes)
    objective.checkpoint_parts()              # (aux_states, meta entries) for save_checkpoint

Per micro-batch (each row of x is one sequence of max_seq_len tokens, y the next tokens) the controller:
1. samples `min(--mc_num_random_variants, --mc_max_counterfactuals)` focused variants per row plus a truncation
   baseline, at a target length annealed from 80 % of the sequence to `--mc_train_wc_length` over the first
   `--mc_wc_anneal_fraction` of the run and held there after (see variants.py);
2. builds every row's gist tree at once, with gradient, one GistNet call per level, on the gists those working
   contexts read (and the gists below them) only;
3. runs the GPT on the variants in one right-padded batch with per-row rotary positions
   (`--mc_positional`), and on the baselines in a second forward without autograd (a yardstick, never trained on:
   only their tail reaches the vocabulary projection, and training measures `TRAIN_BASELINE_ROWS` rows of each
   micro-batch, validation all of them);
4. trains on next-token targets of raw entries; compares variants of a row on their shared raw tail (the longest
   run of final tokens raw in all of them: same target tokens, and more of them than the recent tokens alone, so
   the labels are less noisy), and fits LensNet to those measured losses (lens_training.py);
5. refocuses one sampled WC with the allocator on LensNet's scores to report swap rate and residency.
Objective: vanilla full-sequence loss + `--mc_variant_loss_weight` × MC variant loss + `--mc_lens_loss_weight` ×
lens loss (+ the weighted LensNet regularisers, + `--mc_gist_content_weight` × GistNet's content term,
gist_content.py). With `--mc_variant_trains_base 0` the variant loss trains the MC nets only and the GPT's
weights get the vanilla loss's gradient alone. It returns data and never prints; telemetry events go to the
provider it was given.
Trees are built in RAM whatever `--mc_tree` says: they hold the autograd graph back to GistNet and live for one
micro-batch. `--mc_tree` is recorded with the nets and chooses the store of inference sessions.
"""

import contextlib
import dataclasses
import time

import numpy as np
import torch

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.config import ARCHITECTURE_FIELDS, MCConfig
from megacontext.gist_content import gist_content_loss
from megacontext.lens_training import LensObjective
from megacontext.lensnet import build_variant_membership
from megacontext.mc_metrics import StepMetrics, gist_spread, percentile
from megacontext.nets import AUX_KEY, MCNets, has_mc_nets
from megacontext.telemetry import NoOpTelemetry, TelemetryProvider
from megacontext.tree import MegaContextTree, RamTreeStore, build_gist_levels, gist_closure
from megacontext.variants import (
    RowVariants,
    gists_read,
    sample_row_variants,
    shared_raw_tail,
    shared_tail_mask,
    target_wc_length,
    wc_length_fraction,
)
from megacontext.wc_inputs import build_wc_batch, next_token_targets, stack_targets

TRAINER_KEY = "mc_trainer"  # aux-state entry with the LensNet EMAs (resume)
ADAM_BETAS = (0.8, 0.95)
MIN_TAIL_MULTIPLE = 4  # sequences shorter than 4 × the recent raw tail leave nothing worth compressing
# Rows per training micro-batch whose truncation baseline is measured. The baseline is a yardstick (no label, no
# gradient), so training measures it on a sample for the progress line; `evaluate` measures every row.
TRAIN_BASELINE_ROWS = 1


class VanillaObjective:
    """The plain next-token objective, with the controller's interface (nothing extra to train or report)."""

    optimizers: list = []

    def __init__(self, train_model):
        self.train_model = train_model

    def __call__(self, x, y, step, reduction: str = "mean"):
        loss = self.train_model(x, y, loss_reduction=reduction)
        return loss, loss

    def parameters(self) -> list:
        return []

    def clip_groups(self) -> list:
        return []

    def end_step(self) -> None:
        return None

    def step_metrics(self) -> dict:
        return {}

    def evaluate(self, batches, step: int) -> dict:
        return {}

    def checkpoint_parts(self) -> tuple[dict, dict]:
        return {}, {}


class MCController:
    def __init__(self, cfg: MCConfig, model, num_iterations: int, train_model=None, seed: int = 0,
                 telemetry: TelemetryProvider | None = None):
        self.model = model
        self.train_model = train_model if train_model is not None else model
        self.cfg = cfg.resolve(model.config.sequence_len)
        self.num_iterations = max(1, num_iterations)
        self.seed = seed
        self.device = model.get_device()
        self.nets = MCNets.for_model(self.cfg, model)
        self.aux_dtype = self.cfg.resolve_aux_dtype(self.device.type)
        self.tail = max(self.cfg.recent_tokens, self.cfg.block_size)  # raw in every variant (the shortest shared tail)
        c = self.cfg
        self.lens = LensObjective(c.mc_lens_temperature, c.mc_lens_adv_norm_beta, c.mc_lens_hard_negative_ratio,
                                  c.mc_lens_kl_weight, c.mc_lens_budget_smooth_weight, c.mc_lens_budget_smooth_beta)
        self.allocator = FocusAllocator(AllocatorConfig.from_mc(self.cfg, model.config.sequence_len), seed=seed)
        self.telemetry = telemetry or NoOpTelemetry()
        self.metrics = StepMetrics(self.cfg.mc_max_lod)
        self.optimizers = [self._build_optimizer()]
        self.last_parts: dict = {}  # the loss terms of the last call (tests, debugging)

    # ------------------------------------------------------------------ interface
    @property
    def variants_per_row(self) -> int:
        return min(self.cfg.mc_num_random_variants, self.cfg.mc_max_counterfactuals)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.nets.parameters() if p.requires_grad]

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        """Parameters clipped together: GistNet with the level embedding (the LM loss trains them), LensNet alone
        (its own loss), so the scale of one net's loss never changes the other's clipped update."""
        lens = {id(p) for p in self.nets.lensnet.parameters()}
        params = self.parameters()
        groups = [[p for p in params if id(p) not in lens], [p for p in params if id(p) in lens]]
        return [g for g in groups if g]

    def target_length(self, step: int, seq_len: int | None = None) -> int:
        T, c = seq_len or self.model.config.sequence_len, self.cfg
        frac = wc_length_fraction(step / self.num_iterations, c.mc_train_wc_length, c.mc_wc_anneal_fraction)
        return target_wc_length(T, frac, c.block_size, c.mc_max_lod, self.tail)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, reduction: str = "mean"):
        """(objective to backward, vanilla next-token loss) for one micro-batch x, y: Long[B, T] (y = -1 where not
        supervised). reduction "sum" (chat stages): the vanilla loss summed over supervised tokens, the MC terms
        (means) weighted by that count, so the objective keeps its per-token balance."""
        vanilla = self.train_model(x, y, loss_reduction=reduction)
        if x.shape[1] < MIN_TAIL_MULTIPLE * self.tail:  # too short to compress (short chat batches): vanilla only
            return vanilla, vanilla
        out = self.variant_losses(x, y, step, train=True)
        c = self.cfg
        extra = c.mc_variant_loss_weight * out["variant_loss"] + c.mc_lens_loss_weight * out["lens_loss"] \
            + c.mc_gist_content_weight * out["gist_content_loss"] + out["regularisers"]
        total = vanilla + (extra * (y >= 0).sum() if reduction == "sum" else extra)
        self.last_parts = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        return total, vanilla

    def end_step(self) -> None:
        self.lens.end_step()

    def step_metrics(self) -> dict[str, float]:
        return self.metrics.collect()

    @torch.no_grad()
    def evaluate(self, batches, step: int) -> dict[str, float]:
        """MC metrics of held-out (x, y) batches at the target length of `step` (no training side effects)."""
        was_training = self.nets.training
        self.nets.eval()
        saved = self.lens.state_dict(), self.lens._sums.clone()
        scratch = StepMetrics(self.cfg.mc_max_lod)
        self.metrics, kept = scratch, self.metrics
        try:
            for x, y, *_ in batches:
                self.variant_losses(x, y, step, train=False)
            return {k.replace("mc/", "mc_val/"): v for k, v in scratch.collect().items()}
        finally:
            self.metrics = kept
            self.lens.load_state_dict(saved[0])
            self.lens._sums.copy_(saved[1])
            self.nets.train(was_training)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_parts(self) -> tuple[dict, dict]:
        aux, meta = self.nets.checkpoint_parts()
        aux[TRAINER_KEY] = self.lens.state_dict()
        return aux, meta

    def load_checkpoint_parts(self, meta: dict, aux_states: dict) -> bool:
        """Restore nets (and the LensNet EMAs when saved) from a checkpoint; False if it has no MC nets (a vanilla
        checkpoint: the nets stay freshly initialised). Architecture settings must match (see `from_checkpoint`)."""
        if not has_mc_nets(meta, aux_states):
            return False
        self.nets.load_saved(aux_states[AUX_KEY])
        if TRAINER_KEY in aux_states:
            self.lens.load_state_dict(aux_states[TRAINER_KEY])
        return True

    # ------------------------------------------------------------------ the work
    def variant_losses(self, x: torch.Tensor, y: torch.Tensor, step: int, train: bool) -> dict:
        c = self.cfg
        B, T = x.shape
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        target = self.target_length(step, T)
        y_np = y.cpu().numpy()
        rows = self.sample_variants(x, step)
        n = self.variants_per_row
        with self.telemetry.span("build", into=timings), self.aux_precision():
            trees, levels = self._build_trees(x, rows)
        variants = [wc for r in rows for wc in r.focused]  # row b: its n variants
        tails = [shared_raw_tail(r.focused) for r in rows]  # per row: the target tokens its variants are compared on
        with self.telemetry.span("positional", into=timings):
            batch = build_wc_batch(variants, [trees[b] for b in range(B) for _ in range(n)], self.nets,
                                   self._embed, c.mc_positional, self.model.config.head_dim, self.device)
            W = batch.embeds.shape[1]
            targets = stack_targets([next_token_targets(wc, y_np[i // n]) for i, wc in enumerate(variants)], W,
                                    self.device)
            tail = torch.from_numpy(shared_tail_mask([len(wc) for wc in variants], W,
                                                     [t for t in tails for _ in range(n)])).to(self.device)
        gpt_time = time.perf_counter()
        per_token = self._variant_gpt(inputs_embeds=batch.embeds, rotary=batch.rotary, targets=targets,
                                      loss_reduction="none", targeted_only=True).float()  # (B*n, W); gists: no projection
        gpt_time = time.perf_counter() - gpt_time
        valid = targets >= 0
        variant_loss = (per_token * valid).sum() / valid.sum().clamp(min=1)
        var_tail = _masked_mean(per_token.detach(), tail & valid)  # (B*n,) chat data: unsupervised tokens don't count
        t0 = time.perf_counter()
        measured = B if not train else min(B, TRAIN_BASELINE_ROWS)
        trunc_tail = torch.full((B,), float("nan"), device=self.device)  # NaN: not measured (metrics skip the row)
        trunc_tail[:measured] = self._baseline_tail_losses([r.baseline for r in rows[:measured]], trees[:measured],
                                                           y_np, tails[:measured])
        if not train:  # the same tail with the whole row in context (validation only)
            self.metrics.add("mc/full_tail_loss", float(self._full_tail_losses(x, y, tails).nanmean()))
        gpt_time += time.perf_counter() - t0
        tail_loss = torch.cat([var_tail.view(B, n), trunc_tail[:, None]], 1).flatten()  # row b: n variants, baseline
        with self.telemetry.span("lens", into=timings):
            lens_out = self._lens_terms(batch, variants, var_tail, B, n, step)
        ctrl_ms = (time.perf_counter() - t_start - gpt_time) * 1000.0
        self._record(variant_loss, tail_loss, rows, tails, lens_out, target, B * n + measured, ctrl_ms)
        for k, gists in enumerate(levels, start=1):
            self.metrics.add(f"mc/gist_spread_lod{k}", gist_spread(gists.flatten(0, 1)))
        self.telemetry.emit("mc_timing", {**timings, "step": step, "total_ms": ctrl_ms})
        content = x.new_zeros((), dtype=torch.float32)
        if c.mc_gist_content_weight > 0 or not train:  # at weight 0 only a val metric: its logits are (gists, V)
            content = gist_content_loss(levels, x, self.model.transformer.wte.weight, c.block_size)
            self.metrics.add("mc/gist_content_loss", float(content.detach()))
        return {"variant_loss": variant_loss, "lens_loss": lens_out["lens_loss"], "gist_content_loss": content,
                "regularisers": lens_out["kl"] + lens_out["budget"], "tail_loss": tail_loss, "target": target,
                "wcs": [wc for r in rows for wc in (*r.focused, r.baseline)]}

    @torch.no_grad()
    def _baseline_tail_losses(self, baselines, trees, y_np, tails: list[int]) -> torch.Tensor:
        """Float[len(baselines)] loss of the first rows' truncation baselines on their rows' shared raw tails (NaN:
        no supervised tail token). A yardstick, never trained on: one forward without autograd, vocabulary
        projection of the longest tail only. Every baseline has the same length, so the batch has no padding."""
        batch = build_wc_batch(baselines, trees, self.nets, self.model.embed, self.cfg.mc_positional,
                               self.model.config.head_dim, self.device)
        targets = stack_targets([next_token_targets(wc, y_np[b]) for b, wc in enumerate(baselines)],
                                batch.embeds.shape[1], self.device)
        per_token = self.model(inputs_embeds=batch.embeds, rotary=batch.rotary, targets=targets,
                               loss_reduction="none", loss_last_n=max(tails)).float()  # (B, longest tail)
        return _tail_means(per_token, targets, tails)

    @torch.no_grad()
    def _full_tail_losses(self, x: torch.Tensor, y: torch.Tensor, tails: list[int]) -> torch.Tensor:
        """Float[B] loss of each row's shared raw tail with the whole row in context, as vanilla attention over the
        window sees it. Below the truncation baseline, the model uses the tokens before the truncation window when
        it has them raw; above it (a briefly trained model), it is hurt by many raw tokens, which a few gists
        need not be."""
        per_token = self.model(x, y, loss_reduction="none", loss_last_n=max(tails)).float()  # (B, longest tail)
        return _tail_means(per_token, y, tails)

    def sample_variants(self, x: torch.Tensor, step: int) -> list[RowVariants]:
        """Each row's focused variants and truncation baseline at the target length of `step` (variants.py)."""
        c, target = self.cfg, self.target_length(step, x.shape[1])
        return [sample_row_variants(row, self.variants_per_row, target, c.block_size, c.mc_max_lod, self.tail, step,
                                    self.seed) for row in x.cpu().numpy()]

    def gists_to_build(self, rows: list[RowVariants], num_tokens: int) -> list[np.ndarray]:
        """Bool[B, n_l] per level: the gists the rows' focused variants read and the gists below those. The others
        would get no gradient and change no loss; skipping them is most of GistNet's cost while variants are long."""
        c = self.cfg
        return gist_closure(gists_read([r.focused for r in rows], num_tokens, c.block_size, c.mc_max_lod),
                            c.block_size)

    def _build_trees(self, x: torch.Tensor, rows: list[RowVariants]) -> tuple[list[MegaContextTree], list]:
        """One RAM tree per row over its T tokens, each gist level from one GistNet call (autograd kept), on the
        gists `gists_to_build` names only; and the levels' gists, Float[B, n_l, D] (NaN: not built)."""
        c = self.cfg
        embeds = self._embed(x)  # (B, T, D)
        if c.mc_gist_detach_input:
            embeds = embeds.detach()
        levels = build_gist_levels(embeds, self.nets.gist, c.block_size, c.mc_max_lod,
                                   self.gists_to_build(rows, x.shape[1]))
        trees = [MegaContextTree(RamTreeStore.from_levels(x[b], [g[b] for g in levels], c.block_size, c.mc_max_lod),
                                 self._embed, self.nets.gist) for b in range(x.shape[0])]
        return trees, levels

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The GPT's token embeddings of idx, detached unless the variants train the GPT."""
        embeds = self.model.embed(idx)
        return embeds if self.cfg.mc_variant_trains_base else embeds.detach()

    def _variant_gpt(self, **kwargs) -> torch.Tensor:
        """The GPT on the variants. With --mc_variant_trains_base 0 it runs on detached copies of its weights, so
        the loss reaches the gists (and through them GistNet) but leaves no gradient on the GPT."""
        if self.cfg.mc_variant_trains_base:
            return self.model(**kwargs)
        frozen = {name: t.detach() for name, t in (*self.model.named_parameters(), *self.model.named_buffers())}
        return torch.func.functional_call(self.model, frozen, kwargs=kwargs)

    def _lens_terms(self, batch, wcs, var_tail, B, n, step) -> dict:
        """LensNet's scores on the variants and its fit to their measured tail losses (Float[B*n])."""
        with self.aux_precision():
            scores = self.nets.lensnet(batch.embeds.detach(), batch.levels, batch.indices, batch.mask).float()
        kl, budget = self.lens.regularisers(scores, batch.mask)
        # labels: variants whose shared tail has supervised tokens (all of them in pretraining)
        labelled = np.flatnonzero(torch.isfinite(var_tail).cpu().numpy())
        if labelled.size == 0:
            lens_loss, pred_delta, measured_delta = scores.sum() * 0.0, scores.new_zeros(0), scores.new_zeros(0)
        else:
            group = torch.arange(B).repeat_interleave(n)[labelled]
            membership = build_variant_membership(
                [(torch.from_numpy(wcs[i].levels), torch.from_numpy(wcs[i].indices)) for i in labelled],
                self.cfg.block_size, group)
            sel = torch.from_numpy(labelled).to(self.device)
            labels = self.lens.normalised_losses(var_tail[sel], group)
            lens_loss, pred_delta, measured_delta = self.lens.pair_loss(scores[sel], membership, labels)
        report = self._refocus_report(wcs[0], scores[0, : len(wcs[0])], step)
        return {"lens_loss": lens_loss, "kl": kl, "budget": budget, "report": report,
                "pred_delta": pred_delta, "measured_delta": measured_delta,
                "delta_rms": float(measured_delta.square().mean().sqrt()) if measured_delta.numel() else float("nan")}

    def _refocus_report(self, wc, scores, step):
        """One allocator pass over a sampled WC with LensNet's scores, budget = that WC's own length."""
        alloc = self.allocator
        alloc.cfg = dataclasses.replace(alloc.cfg, soft_max_length=len(wc),
                                        hard_max_length=max(len(wc), alloc.cfg.hard_max_length))
        t0 = time.perf_counter()
        new_wc, report = alloc.step(wc, scores.detach().cpu().numpy())
        self.telemetry.emit("focus_allocator", {
            "session": "train", "expanded": report.expands, "collapsed": report.collapses,
            "swap_rate": report.swap_rate, "length_before": report.length_before,
            "length_after": report.length_after, "residency": 1.0 - report.swap_rate,
            "score_mean": float(scores.detach().mean()), "step": step, "allocator_ms": (time.perf_counter() - t0) * 1e3})
        self.telemetry.emit("working_context_snapshot", {
            "session": "train", "length": len(new_wc), "w_max": self.cfg.wc_max(), "levels": new_wc.levels.tolist(),
            "indices": new_wc.indices.tolist(), "tokens_covered": new_wc.num_tokens, "step": step,
            "level_counts": new_wc.level_counts(self.cfg.mc_max_lod).tolist(), "scheme": self.cfg.mc_positional})
        return report

    def _record(self, variant_loss, tail_loss, rows, tails, lens_out, target, num_wcs, ctrl_ms) -> None:
        m, n = self.metrics, self.variants_per_row
        tl = tail_loss.view(-1, n + 1)  # (B, n + 1): variants, then the baseline
        var_tail, trunc_tail = tl[:, :n], tl[:, n]
        adv = trunc_tail[:, None] - var_tail  # (B, n); NaN for rows without supervised tail tokens
        ok = torch.isfinite(adv)
        m.add("mc/token_loss", float(variant_loss.detach()))
        if ok.any():
            m.add("mc/tail_loss", float(var_tail[ok].mean()))
            m.add("mc/trunc_loss", float(trunc_tail[ok.any(1)].mean()))
            m.add("mc/adv_delta_mean", float(adv[ok].mean()))
            m.add("mc/adv_delta_p95", percentile(adv[ok], 0.95))
        lods = torch.tensor([r.max_levels for r in rows], device=ok.device)  # (B, n)
        plain = torch.tensor([r.plain for r in rows], device=ok.device)  # (B, n)
        for k in range(1, self.cfg.mc_max_lod + 1):
            for name, sel in ((f"mc/lod{k}_loss", (lods == k) & ok),
                              (f"mc/staircase_lod{k}_loss", (lods == k) & plain & ok)):
                if sel.any():
                    m.add(name, float(var_tail[sel].mean()), weight=int(sel.sum()))
            m.add_values(f"mc/staircase_lod{k}_gain", adv[(lods == k) & plain & ok])  # one plain variant per row
        m.add("mc/lens_loss", float(lens_out["lens_loss"].detach()))
        m.add_pairs(lens_out["pred_delta"], lens_out["measured_delta"])
        m.add("mc/pair_delta_rms", lens_out["delta_rms"])
        m.add("mc/swap_rate", lens_out["report"].swap_rate)
        m.add("mc/residency", 1.0 - lens_out["report"].swap_rate)
        m.add("mc/target_wc_length", target)
        m.add("mc/shared_tail_tokens", float(np.mean(tails)))
        m.add("mc/variants_total", num_wcs)
        m.add("mc/time_controller_ms", ctrl_ms)

    def aux_precision(self):
        """GistNet / LensNet compute dtype (--mc_aux_dtype): bf16 autocast, or fp32 with autocast off."""
        dev = self.device.type
        if self.aux_dtype == torch.bfloat16:
            return torch.autocast(device_type=dev, dtype=torch.bfloat16)
        if dev in ("cuda", "cpu"):
            return torch.autocast(device_type=dev, enabled=False)
        return contextlib.nullcontext()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(self.parameters(), lr=self.cfg.mc_lr, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        return opt


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float[N] row means of values[N, W] over mask; NaN for a row with nothing selected."""
    mean = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.where(mask.any(1), mean, torch.full_like(mean, float("nan")))


def _tail_means(per_token: torch.Tensor, targets: torch.Tensor, tails: list[int]) -> torch.Tensor:
    """Float[B] mean of per_token[B, n] (the last n positions' losses, n = max(tails)) over row b's last tails[b]
    positions that have a target (targets: Long[B, W]); NaN for a row without one."""
    n = per_token.shape[1]
    in_tail = torch.from_numpy(shared_tail_mask([n] * len(tails), n, tails)).to(per_token.device)
    return _masked_mean(per_token, in_tail & (targets[:, -n:] >= 0))


def training_objective(mc_cfg: MCConfig, model, train_model, num_iterations: int, seed: int = 0,
                       telemetry: TelemetryProvider | None = None):
    """`MCController` when --mc is on, else `VanillaObjective`: the one object a training loop calls."""
    if not mc_cfg.mc:
        return VanillaObjective(train_model)
    return MCController(mc_cfg, model, num_iterations, train_model=train_model, seed=seed, telemetry=telemetry)


def config_for_checkpoint(cli_cfg: MCConfig, meta: dict) -> tuple[MCConfig, list[str]]:
    """The config to continue a checkpoint's MC nets with: architecture settings from the checkpoint, training knobs
    from the command line. Returns (config, names of architecture flags the checkpoint overrode)."""
    saved = meta.get("mc_config")
    if saved is None:
        return cli_cfg, []
    saved_cfg = MCConfig.from_dict(saved)
    changed = [f for f in ARCHITECTURE_FIELDS if getattr(saved_cfg, f) != getattr(cli_cfg, f)]
    merged = MCConfig(**{**cli_cfg.to_dict(), **{f: getattr(saved_cfg, f) for f in ARCHITECTURE_FIELDS}})
    return merged.validate(), changed
