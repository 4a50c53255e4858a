"""What a training script needs around the MCController: the telemetry provider, the --mc_auto_batch arithmetic,
and continuing a checkpoint's MC nets. Each function returns data (and messages to print); none prints.
"""

import math
import os
from dataclasses import dataclass

from megacontext.config import MCConfig
from megacontext.controller import TRAIN_BASELINE_ROWS, MCController, config_for_checkpoint, training_objective
from megacontext.nets import has_mc_nets, mc_model_tag
from megacontext.telemetry import JsonlTelemetry, TelemetryProvider, telemetry_from_env
from megacontext.variants import mean_wc_length_fraction

SERVICE_NAME = "megacontext-train"
FORWARD_ONLY_SHARE = 1 / 3  # a forward pass without autograd ~ 1/3 of forward + backward FLOPs
PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints"}


def training_telemetry(jsonl_path: str | None = None, env=None) -> TelemetryProvider:
    """MC_OTEL_ENDPOINT set -> OpenTelemetry (OTLP); else --mc_telemetry_jsonl PATH -> JSONL; else whatever
    MC_TELEMETRY asks for (unset: NoOp). Providers never raise on a dead collector or a full disk."""
    env = os.environ if env is None else env
    if env.get("MC_OTEL_ENDPOINT"):
        return telemetry_from_env(SERVICE_NAME, env={**env, "MC_TELEMETRY": "otel"})
    if jsonl_path:
        return JsonlTelemetry(jsonl_path)
    return telemetry_from_env(SERVICE_NAME, env=env)


def variant_multiplier(cfg: MCConfig, device_batch_size: int) -> float:
    """Sequence positions the GPT trains on per training token under --mc, averaged over the annealed run:
    1 (the vanilla forward) + variants × mean target length fraction, plus the truncation baselines, which run
    forward only (about a third of a forward + backward) on `TRAIN_BASELINE_ROWS` rows of each micro-batch."""
    mean_fraction = mean_wc_length_fraction(cfg.mc_train_wc_length, cfg.mc_wc_anneal_fraction)
    variants = min(cfg.mc_num_random_variants, cfg.mc_max_counterfactuals)
    baseline_rows = min(device_batch_size, TRAIN_BASELINE_ROWS) / device_batch_size
    return 1.0 + (variants + FORWARD_ONLY_SHARE * baseline_rows) * mean_fraction


@dataclass
class BatchPlan:
    device_batch_size: int
    num_iterations: int
    message: str


def auto_batch(cfg: MCConfig, device_batch_size: int, num_iterations: int) -> BatchPlan:
    """--mc_auto_batch 1: divide the device batch (memory) and the number of steps (compute) by the variant
    multiplier so an --mc run processes about as many positions as the vanilla run. The new device batch divides
    the old one, so the total batch size still splits into whole accumulation steps."""
    if not (cfg.mc and cfg.mc_auto_batch):
        return BatchPlan(device_batch_size, num_iterations, "")
    fits = [d for d in range(device_batch_size, 0, -1)
            if device_batch_size % d == 0 and d * variant_multiplier(cfg, d) <= device_batch_size]
    dbs = fits[0] if fits else 1
    mult = variant_multiplier(cfg, dbs)
    iters = max(1, math.ceil(num_iterations / mult - 1e-9))  # (float noise must not add a step)
    msg = (f"--mc_auto_batch: variant multiplier {mult:.2f} -> device batch {device_batch_size} -> {dbs} rows, "
           f"{num_iterations} -> {iters} iterations (pass --mc_auto_batch 0 to keep them)")
    return BatchPlan(dbs, iters, msg)


def objective_for_run(cfg: MCConfig, model, train_model, num_iterations: int, seed: int,
                      telemetry_jsonl: str | None = None, meta: dict | None = None, aux_states: dict | None = None):
    """(objective, message) for a stage. With a checkpoint's (meta, aux_states): an MC checkpoint's nets continue
    (its architecture settings win over the flags), a vanilla one starts the nets fresh; the message says which."""
    if not cfg.mc:
        return training_objective(cfg, model, train_model, num_iterations), ""
    message, changed = "", []
    if meta is not None and has_mc_nets(meta, aux_states or {}):
        cfg, changed = config_for_checkpoint(cfg, meta)
    ctrl = MCController(cfg, model, num_iterations, train_model=train_model, seed=seed,
                        telemetry=training_telemetry(telemetry_jsonl))
    if meta is not None:
        if ctrl.load_checkpoint_parts(meta, aux_states or {}):
            message = "--mc: continuing the checkpoint's MegaContext nets"
            if changed:
                message += f" (its {', '.join(changed)} override the command line)"
        else:
            message = "--mc: the checkpoint has no MegaContext nets (a vanilla model): GistNet, LensNet and the " \
                      "level embedding start fresh"
    return ctrl, message


def stage_objective(cfg: MCConfig, model, train_model, model_tag: str, start: dict, num_iterations: int, seed: int,
                    telemetry_jsonl: str | None = None):
    """(objective, model tag to save under, message) for mid_train / chat_sft. `start` says which checkpoint the
    model came from ({"phase": base|mid|sft, "model_tag", "step"}); under --mc its MC nets continue (or start fresh
    from a vanilla checkpoint), and the stage saves under the MC tag so it never overwrites a vanilla run."""
    if not cfg.mc:
        return training_objective(cfg, model, train_model, num_iterations), model_tag, ""
    from nanochat.checkpoint_manager import load_checkpoint
    from nanochat.common import get_base_dir

    checkpoint_dir = os.path.join(get_base_dir(), PHASE_DIRS[start["phase"]], start["model_tag"])
    _, _, meta, aux = load_checkpoint(checkpoint_dir, start["step"], "cpu")
    objective, message = objective_for_run(cfg, model, train_model, num_iterations, seed, telemetry_jsonl, meta, aux)
    return objective, mc_model_tag(model_tag), message
