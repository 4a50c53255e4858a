"""The loop every training stage runs: at each step evaluate what is due, save what is due, take one optimizer
step, then log it. base_train, mid_train and chat_sft differ only in the hooks they pass.

Order matters: step N's evaluation and checkpoint see the weights after N updates, and a run resumed from
checkpoint N starts with step N's evaluation (not its save, which is already on disk) and continues exactly.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Protocol

from nanochat.common import print0
from nanochat.train_loop import ProgressMeter, is_finite


@dataclasses.dataclass
class StepResult:
    """What one optimizer step reports to the loop."""

    loss: float  # mean training loss of the step over every rank
    lrm: float  # learning-rate multiplier applied
    grad_norm: float
    epoch: float | None = None  # shown in the progress line when known
    tokens: int | None = None  # tokens computed this step when it varies (padded SFT batches); None: fixed
    logs: dict = dataclasses.field(default_factory=dict)  # extra W&B fields, e.g. "train/supervised_tokens"
    note: str = ""  # appended to the progress line, e.g. MegaContext's loss and controller time


class LossLog:
    """--loss-log: one JSON object per line, appended (a resumed run continues the same file); rank 0 only."""

    def __init__(self, path: str | None, master: bool):
        self.path = path if master else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def due(step: int, every: int, last: bool, at_zero: bool = True) -> bool:
    """Periodic work: every `every` steps (never if every <= 0; at step 0 only if at_zero), always when `last`."""
    return last or (every > 0 and step % every == 0 and (at_zero or step > 0))


def run_steps(*, start_step: int, num_iterations: int, save_every: int, meter: ProgressMeter, wandb_run,
              evaluate: Callable[[int, bool], None], save: Callable[[int], None],
              step: Callable[[int], StepResult],
              after_step: Callable[[int, StepResult, float], None] | None = None) -> list[float]:
    """Steps start_step .. num_iterations - 1, with evaluate(step, last) and save(step) around them; returns the
    losses. `evaluate` decides which of its evaluations are due; `save` runs every save_every steps and at the
    end, never at the step the run started from. `after_step(step_done, result, dt)` sees each finished step."""
    losses = []
    for index in range(start_step, num_iterations + 1):
        last = index == num_iterations
        evaluate(index, last)
        if index != start_step and due(index, save_every, last, at_zero=False):
            save(index)
        if last:
            break
        t0 = time.perf_counter()
        result = step(index)  # .item() inside waits for the device, so dt is honest
        dt = time.perf_counter() - t0
        if not is_finite(result.loss):
            raise FloatingPointError(f"loss is {result.loss} at step {index + 1}; lower the learning rates or "
                                     "check the data")
        losses.append(result.loss)
        if result.tokens is not None:
            meter.tokens_per_step = result.tokens
        print0(meter.update(index + 1, result.loss, result.lrm, dt, result.epoch) + result.note, flush=True)
        wandb_run.log({"step": index + 1, "train/loss": result.loss, "train/lrm": result.lrm, "train/dt": dt,
                       "train/grad_norm": result.grad_norm, "train/tok_per_sec": meter.tokens_per_step / dt,
                       **result.logs})
        if after_step is not None:
            after_step(index + 1, result, dt)
    return losses


class Stage(Protocol):
    """A training stage as `run_stage` drives it (scripts.mid_train.MidStage, scripts.chat_sft.SFTStage)."""

    start_step: int
    num_iterations: int
    meter: ProgressMeter
    wandb_run: object
    loss_log: LossLog  # its evaluate hook writes its evaluations; run_stage writes every step

    def describe(self) -> None: ...  # print what is about to run
    def evaluate(self, step: int, last: bool) -> None: ...
    def save(self, step: int) -> None: ...
    def step(self, step: int) -> StepResult: ...
    def finish(self, losses: list[float]) -> dict: ...  # report, close W&B, return the run's summary


def run_stage(stage: Stage, save_every: int) -> dict:
    """describe -> run_steps with the stage's hooks (each step also goes to the stage's loss log) -> finish."""
    stage.describe()
    losses = run_steps(start_step=stage.start_step, num_iterations=stage.num_iterations, save_every=save_every,
                       meter=stage.meter, wandb_run=stage.wandb_run, evaluate=stage.evaluate, save=stage.save,
                       step=stage.step, after_step=lambda step, r, dt: stage.loss_log.write(
                           step=step, loss=r.loss, lrm=r.lrm, dt=dt, **r.logs))
    return stage.finish(losses)
