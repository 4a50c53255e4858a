"""Around the controller: which telemetry provider a run gets, --mc_auto_batch, continuing checkpoints."""

import dataclasses
import warnings

import pytest
import torch

from megacontext.config import MCConfig
from megacontext.controller import MCController
from megacontext.telemetry import JsonlTelemetry, NoOpTelemetry, OpenTelemetryProvider, load_jsonl_events
from megacontext.train_wiring import auto_batch, objective_for_run, training_telemetry, variant_multiplier
from nanochat.gpt import GPT, GPTConfig

K, T = 4, 64


def _model():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, 256, T))
    model.init_weights()
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn_like(w) * 0.02)
    return model


def _step(telemetry):
    ctrl = MCController(MCConfig(mc=True, block_size=K, mc_num_random_variants=2), _model(), 10, telemetry=telemetry)
    x, y = torch.randint(0, 256, (2, T)), torch.randint(0, 256, (2, T))
    total, _ = ctrl(x, y, 0)
    total.backward()
    return ctrl


def test_provider_follows_the_environment(tmp_path):
    path = str(tmp_path / "ev.jsonl")
    assert isinstance(training_telemetry(None, env={}), NoOpTelemetry)
    assert isinstance(training_telemetry(path, env={}), JsonlTelemetry)
    otel = training_telemetry(path, env={"MC_OTEL_ENDPOINT": "http://127.0.0.1:9", "MC_OTEL_TIMEOUT": "0.5"})
    assert isinstance(otel, OpenTelemetryProvider)  # the endpoint wins over the JSONL path
    otel.close()


def test_a_training_step_writes_timing_allocator_and_wc_events_to_jsonl(tmp_path):
    path = str(tmp_path / "ev.jsonl")
    tel = training_telemetry(path, env={})
    _step(tel)
    tel.close()
    events = {e["event"]: e["fields"] for e in load_jsonl_events(path)}
    assert {"mc_timing", "focus_allocator", "working_context_snapshot"} <= set(events)
    assert all(events["mc_timing"][k] >= 0 for k in ("build_ms", "positional_ms", "lens_ms"))
    snap = events["working_context_snapshot"]
    assert len(snap["levels"]) == snap["length"] == len(snap["indices"])


def test_a_dead_collector_never_stops_training(monkeypatch):
    env = {"MC_OTEL_ENDPOINT": "http://127.0.0.1:9", "MC_OTEL_TIMEOUT": "0.5"}
    tel = training_telemetry(None, env=env)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ctrl = _step(tel)
        tel.flush()
        tel.close()
    assert ctrl.nets.gistnet.blocks[0].mlp.proj.weight.grad is not None  # the step completed, gradients exist


def test_auto_batch_keeps_the_vanilla_position_budget():
    cfg = MCConfig(mc=True, mc_num_random_variants=2, mc_train_wc_length=0.2, mc_wc_anneal_fraction=1.0)
    # 2 variants at half the sequence on average, the forward-only baseline on 1 row of each micro-batch
    assert variant_multiplier(cfg, 1) == pytest.approx(1 + (2 + 1 / 3) * 0.5)
    assert variant_multiplier(cfg, 4) == pytest.approx(1 + (2 + 1 / 12) * 0.5)
    held = dataclasses.replace(cfg, mc_wc_anneal_fraction=0.5)  # half the run at 80 % -> 20 %, half held at 20 %
    assert variant_multiplier(held, 1) == pytest.approx(1 + (2 + 1 / 3) * (0.5 * 0.5 + 0.5 * 0.2))
    plan = auto_batch(cfg, device_batch_size=8, num_iterations=100)
    # the largest divisor d of 8 with d × multiplier(d) <= 8: 4 × 2.04 > 8, 2 × 2.08 <= 8
    assert plan.device_batch_size == 2
    assert plan.num_iterations == 48 and "2.08" in plan.message
    off = auto_batch(MCConfig(mc=True, mc_auto_batch=False), 8, 100)
    assert (off.device_batch_size, off.num_iterations, off.message) == (8, 100, "")


def test_a_vanilla_checkpoint_starts_fresh_nets_and_says_so():
    model = _model()
    cfg = MCConfig(mc=True, block_size=K)
    ctrl, message = objective_for_run(cfg, model, model, 10, seed=0, meta={"step": 5}, aux_states={})
    assert "start fresh" in message
    aux, meta = ctrl.checkpoint_parts()
    with torch.no_grad():
        ctrl.nets.level_embedding.emb.weight[1:] += 1.0
    aux, meta = ctrl.checkpoint_parts()
    again, message = objective_for_run(MCConfig(mc=True, block_size=8), model, model, 10, seed=0, meta=meta,
                                       aux_states=aux)
    assert "continuing" in message and "block_size" in message and again.cfg.block_size == K
    torch.testing.assert_close(again.nets.level_embedding.emb.weight, ctrl.nets.level_embedding.emb.weight)
