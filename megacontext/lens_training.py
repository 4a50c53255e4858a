"""LensNet's training signal from measured variant losses, with the stability helpers the knobs configure.

Per micro-batch the controller measures every random variant's mean loss on the shared raw tail (same target
tokens in every variant of a row) and LensNet's scores on each variant's entries. From those:

- advantage normalisation (`--mc_lens_adv_norm_beta`, 0 = off): the measured losses, centred per row, are divided
  by the running RMS of those centred losses (an EMA with that beta), so the Bradley–Terry temperature works on a
  stable scale as the model (and its loss gaps) change over training;
- hard negatives (`--mc_lens_hard_negative_ratio`, 1 = all pairs): only the top fraction of same-row pairs by
  |measured Δloss| is fitted; near-ties carry more noise than preference;
- Bradley–Terry fit (`--mc_lens_temperature`): soft-target KL between measured and predicted pair preferences,
  the loss of `megacontext.lensnet.lens_loss` restricted to the kept pairs;
- policy KL (`--mc_lens_kl_weight`): KL(Bernoulli(σ(s)) ‖ Bernoulli(½)) averaged over real entries, i.e. the
  divergence of LensNet's expand/collapse policy from the neutral "no edit" policy; it keeps scores small unless
  the measured losses ask for them;
- budget smoothing (`--mc_lens_budget_smooth_weight`, `--mc_lens_budget_smooth_beta`): the policy's net budget
  demand is the mean of tanh(s) over real entries (+1: expand everything, -1: collapse everything); its EMA across
  steps is the reference and the penalty is weight × (demand − EMA)², so the demand drifts instead of jumping.

EMAs change only in `end_step` with statistics summed over every micro-batch and process of the step, so a
multi-process run and a single process with the same global batch update them identically, and a resumed run
restores them from `state_dict`.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacontext.lensnet import VariantMembership, pairwise_deltas, predicted_variant_losses


class LensObjective:
    def __init__(self, temperature: float, adv_norm_beta: float, hard_negative_ratio: float, kl_weight: float,
                 budget_smooth_weight: float, budget_smooth_beta: float):
        self.temperature = temperature
        self.adv_norm_beta = adv_norm_beta
        self.hard_negative_ratio = hard_negative_ratio
        self.kl_weight = kl_weight
        self.budget_smooth_weight = budget_smooth_weight
        self.budget_smooth_beta = budget_smooth_beta
        self.adv_rms: float | None = None  # EMA of the RMS of per-row centred losses
        self.budget_ema: float | None = None  # EMA of the policy's budget demand
        self._sums = torch.zeros(4, dtype=torch.float64)  # centred sq. sum, its count, demand sum, its count

    # ------------------------------------------------------------------ per micro-batch
    def normalised_losses(self, measured: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Float[N] measured losses -> per-row centred losses / EMA RMS (unchanged when normalisation is off or
        has no statistics yet). Records this batch's statistics for `end_step`."""
        measured = measured.detach().float()
        g = group.to(measured.device)
        rows = int(g.max()) + 1
        mean = torch.zeros(rows, device=measured.device).index_add(0, g, measured)
        count = torch.zeros(rows, device=measured.device).index_add(0, g, torch.ones_like(measured))
        centred = measured - (mean / count.clamp(min=1))[g]
        self._sums[0] += float(centred.square().sum())
        self._sums[1] += centred.numel()
        if self.adv_norm_beta <= 0 or self.adv_rms is None or self.adv_rms <= 0:
            return measured
        return centred / self.adv_rms

    def pair_loss(self, scores: torch.Tensor, membership: VariantMembership, labels: torch.Tensor):
        """(Bradley–Terry loss over the kept pairs, predicted Δ, measured Δ over ALL pairs)."""
        scores = scores[:, : membership.entry_node.shape[1]]  # the batch may be padded wider (e.g. by baselines)
        pred = predicted_variant_losses(scores, membership)  # (N,)
        pred_delta, measured_delta = pairwise_deltas(pred, labels, membership.group)  # (P,), (P,)
        if pred_delta.numel() == 0:
            return scores.sum() * 0.0, pred_delta, measured_delta
        keep = hard_negative_pairs(measured_delta, self.hard_negative_ratio)
        loss = soft_bradley_terry(pred_delta[keep], measured_delta[keep], self.temperature)
        return loss, pred_delta, measured_delta

    def regularisers(self, scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy KL term, budget smoothing term), each already multiplied by its weight."""
        s = scores[mask]
        kl = policy_kl_to_neutral(s)
        demand = torch.tanh(s).mean() if s.numel() else s.sum()
        self._sums[2] += float(demand.detach())
        self._sums[3] += 1
        if self.budget_ema is None or self.budget_smooth_weight == 0:
            budget = demand * 0.0
        else:
            budget = (demand - self.budget_ema).square()
        return self.kl_weight * kl, self.budget_smooth_weight * budget

    # ------------------------------------------------------------------ per optimizer step
    def end_step(self) -> None:
        """Fold this step's statistics (summed over processes) into the EMAs."""
        sums = self._sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        self._sums.zero_()
        sq, n, demand, m = (float(v) for v in sums)
        if n > 0:
            rms = math.sqrt(sq / n)
            b = self.adv_norm_beta
            self.adv_rms = rms if self.adv_rms is None else b * self.adv_rms + (1 - b) * rms
        if m > 0:
            mean_demand = demand / m
            b = self.budget_smooth_beta
            self.budget_ema = mean_demand if self.budget_ema is None else b * self.budget_ema + (1 - b) * mean_demand

    def state_dict(self) -> dict:
        return {"adv_rms": self.adv_rms, "budget_ema": self.budget_ema}

    def load_state_dict(self, state: dict) -> None:
        self.adv_rms, self.budget_ema = state["adv_rms"], state["budget_ema"]


def hard_negative_pairs(measured_delta: torch.Tensor, ratio: float) -> torch.Tensor:
    """Long[k] indices of the ceil(ratio · P) pairs with the largest |measured Δ| (all pairs when ratio >= 1)."""
    P = measured_delta.numel()
    k = max(1, math.ceil(ratio * P)) if P else 0
    if k >= P:
        return torch.arange(P, device=measured_delta.device)
    return measured_delta.abs().topk(k).indices


def soft_bradley_terry(pred_delta: torch.Tensor, measured_delta: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean KL(P ‖ P̂) over pairs, P = σ(−Δmeasured/τ), P̂ = σ(−Δpredicted/τ): the soft-target loss of lens_loss."""
    logit_true = -measured_delta.detach().float() / temperature
    target = torch.sigmoid(logit_true)
    cross = F.binary_cross_entropy_with_logits(-pred_delta / temperature, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(logit_true, target, reduction="none")
    return (cross - entropy).mean()


def policy_kl_to_neutral(scores: torch.Tensor) -> torch.Tensor:
    """Mean over entries of KL(Bernoulli(σ(s)) ‖ Bernoulli(½)) = log 2 − H(σ(s)); 0 exactly at s = 0."""
    if scores.numel() == 0:
        return scores.sum()
    p = torch.sigmoid(scores)
    entropy = F.binary_cross_entropy_with_logits(scores, p, reduction="none")
    return (math.log(2.0) - entropy).mean()
