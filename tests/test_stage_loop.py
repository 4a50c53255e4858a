"""nanochat.stage_loop.run_steps: the order of evaluate / save / step every stage relies on, and its refusals;
nanochat.run_state: optimizer flags declared once, restored states keep this run's learning rates."""

import argparse
import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.run_state import add_optimizer_flags, restore_optimizer_states, setup_optimizers
from nanochat.stage_loop import StepResult, due, run_steps
from nanochat.train_loop import DummyWandb, ProgressMeter


class Recorder(DummyWandb):
    def __init__(self):
        self.events, self.logged = [], []

    def log(self, record, *args, **kwargs):
        self.logged.append(record)


def run(start_step, num_iterations, save_every, losses):
    rec = Recorder()

    def step(i):
        rec.events.append(("step", i))
        return StepResult(losses[i], lrm=1.0, grad_norm=0.5, tokens=10 * (i + 1), logs={"train/extra": i})

    out = run_steps(start_step=start_step, num_iterations=num_iterations, save_every=save_every,
                    meter=ProgressMeter(num_iterations, 1, 1.0, None), wandb_run=rec,
                    evaluate=lambda i, last: rec.events.append(("eval", i, last)),
                    save=lambda i: rec.events.append(("save", i)), step=step,
                    after_step=lambda i, r, dt: rec.events.append(("after", i, r.loss)))
    return out, rec


def test_order_is_eval_save_step_log():
    out, rec = run(0, 3, 2, [3.0, 2.0, 1.0])
    assert out == [3.0, 2.0, 1.0]
    assert rec.events == [("eval", 0, False), ("step", 0), ("after", 1, 3.0),
                          ("eval", 1, False), ("step", 1), ("after", 2, 2.0),
                          ("eval", 2, False), ("save", 2), ("step", 2), ("after", 3, 1.0),
                          ("eval", 3, True), ("save", 3)]
    assert [r["step"] for r in rec.logged] == [1, 2, 3]
    assert rec.logged[1]["train/extra"] == 1 and rec.logged[1]["train/tok_per_sec"] > 0


def test_resumed_run_does_not_save_its_start_step_again():
    out, rec = run(2, 3, 1, [9.0, 9.0, 1.0])
    assert out == [1.0]
    assert rec.events == [("eval", 2, False), ("step", 2), ("after", 3, 1.0), ("eval", 3, True), ("save", 3)]
    _, done = run(3, 3, 1, [])
    assert done.events == [("eval", 3, True)]  # a finished run only re-evaluates


def test_non_finite_loss_stops_the_run():
    with pytest.raises(FloatingPointError, match="at step 2"):
        run(0, 3, -1, [1.0, math.nan, 1.0])


def test_due():
    assert [s for s in range(7) if due(s, 3, last=False)] == [0, 3, 6]
    assert [s for s in range(7) if due(s, 3, last=False, at_zero=False)] == [3, 6]
    assert not due(5, -1, last=False) and due(5, -1, last=True)


def test_optimizer_flags_and_restore_keep_this_runs_lr():
    p = argparse.ArgumentParser()
    add_optimizer_flags(p)
    args = p.parse_args(["--matrix_lr=0.04", "--weight-decay=0.1"])
    model = GPT(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    opts = setup_optimizers(model, args, lr_frac=0.5)
    muon_group = opts[1].param_groups[0]
    assert muon_group["initial_lr"] == muon_group["lr"] == pytest.approx(0.02) and muon_group["weight_decay"] == 0.1
    model(torch.randint(0, 32, (1, 8)), torch.randint(0, 32, (1, 8))).backward()
    for opt in opts:
        opt.step()
    saved = [opt.state_dict() for opt in opts]
    fresh = setup_optimizers(model, p.parse_args(["--matrix-lr=0.01"]))
    restore_optimizer_states(fresh, saved)
    assert fresh[1].param_groups[0]["initial_lr"] == pytest.approx(0.01)  # this run's flag, not the saved 0.02
    assert fresh[1].param_groups[0]["weight_decay"] == 0.0
    assert fresh[0].state_dict()["state"].keys() == saved[0]["state"].keys() and fresh[0].state_dict()["state"]
