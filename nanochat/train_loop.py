"""The arithmetic of a training run, kept out of the scripts so it can be tested and reused.

- `grad_accum_steps`: how many micro-batches one optimizer step takes (and a clear error when it is not whole);
- `training_horizon`: number of optimizer steps from --num-iterations, --target-flops or a tokens:params ratio;
- `lr_multiplier` / `muon_momentum` / `apply_schedules`: warmup -> constant -> warmdown LR, Muon momentum ramp;
- `ProgressMeter`: the one-line progress report (loss EMA, tok/s, MFU on GPU, ETA) and its resumable state;
- `peak_flops`: a GPU's dense bf16 peak, for MFU;
- `init_wandb`: a W&B run on rank 0 when --run is not "dummy", else an object that logs nothing.

Used by scripts.base_train (and the mid / SFT loops, which share the same schedules and progress line).
"""

import math
import os

import torch

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, matched by substring of the device
# name, most specific first. MFU is only reported for GPUs listed here.
GPU_PEAK_BF16_FLOPS = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A6000", 155e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]

EMA_BETA = 0.9  # smoothing of the printed loss; the raw loss goes to W&B and --loss-log
TIMING_WARMUP_STEPS = 5  # the first steps include torch.compile and allocator warmup; ETA ignores them


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that device_batch × seq_len × world × steps = total tokens."""
    for name, value in (("--total-batch-size", total_batch_size), ("--device-batch-size", device_batch_size),
                        ("--max-seq-len", seq_len), ("world size", world_size)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    per_step = device_batch_size * seq_len * world_size  # tokens of one forward/backward over all ranks
    if total_batch_size % per_step == 0:
        return total_batch_size // per_step
    lower = max(per_step, total_batch_size // per_step * per_step)
    upper = lower + per_step if lower < total_batch_size else lower
    rows = total_batch_size // (seq_len * world_size) if total_batch_size % (seq_len * world_size) == 0 else 0
    batch_hint = ""
    if rows:
        divisors = [d for d in range(1, rows + 1) if rows % d == 0]
        batch_hint = f", or keep it and pick --device-batch-size from {divisors[-8:]}"
    raise ValueError(
        f"--total-batch-size={total_batch_size} tokens is not a multiple of device_batch_size × max_seq_len × "
        f"world_size = {device_batch_size} × {seq_len} × {world_size} = {per_step}; use a multiple of {per_step} "
        f"(e.g. {lower} or {upper}){batch_hint}"
    )


def training_horizon(num_iterations: int, target_flops: float, target_param_data_ratio: float, num_params: int,
                     flops_per_token: float, total_batch_size: int) -> tuple[int, str]:
    """(optimizer steps, how they were chosen). The first positive setting wins, in the order of the arguments."""
    if num_iterations > 0:
        return num_iterations, f"--num-iterations={num_iterations}"
    if target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
        return max(1, steps), f"--target-flops={target_flops:.3e} at {flops_per_token:.3e} FLOPs/token"
    if target_param_data_ratio > 0:
        tokens = target_param_data_ratio * num_params
        steps = max(1, round(tokens / total_batch_size))
        return steps, f"--target-param-data-ratio={target_param_data_ratio} × {num_params:,} params = {tokens:,.0f} tokens"
    raise ValueError("set one of --num-iterations, --target-flops or --target-param-data-ratio to a positive value")


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup over the first warmup_ratio of the run, flat, then linear decay to final_lr_frac over the
    last warmdown_ratio. `step` is the 0-based index of the update about to be applied."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_iterations - warmdown:
        return 1.0
    remaining = max(0, num_iterations - step) / max(1, warmdown)  # 1 at the start of the warmdown, -> 0 at the end
    return final_lr_frac + (1.0 - final_lr_frac) * remaining


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp_steps: int = 300) -> float:
    """Muon's momentum ramps up over the first few hundred steps (modded-nanogpt): early gradients change fast."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


def apply_schedules(optimizers, lrm: float, momentum: float | None = None) -> None:
    """Set every group's lr to initial_lr × lrm, and Muon groups' momentum when given."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if momentum is not None and "momentum" in group and not isinstance(opt, torch.optim.AdamW):
                group["momentum"] = momentum


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one accelerator, or None where unknown (CPU, MPS, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def format_count(x: float) -> str:
    """806123 -> '806K', 5123 -> '5.1K', 1.5e6 -> '1.50M': short enough for a progress line."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e5:
        return f"{x / 1e3:.0f}K"
    if x >= 1e3:
        return f"{x / 1e3:.1f}K"
    return f"{x:.0f}"


class ProgressMeter:
    """Builds the per-step progress line and keeps the state it needs across a resume (loss EMA, time spent).

    step 00100/16704 (0.60%) | loss: 8.12 | lrm: 1.00 | dt: 650ms | tok/sec: 806K | mfu: 45.2 | epoch: 1 |
    total time: 1.08m | eta: 178.5m
    """

    def __init__(self, num_iterations: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops_total: float | None):
        self.num_iterations = num_iterations
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total  # peak of one device × world size; None: no MFU
        self.ema = 0.0
        self.ema_steps = 0
        self.total_time = 0.0  # seconds of training steps (not eval / checkpoint time)
        self.timed_time = 0.0  # the same without the warmup steps, for the ETA
        self.timed_steps = 0
        self.steps_seen = 0  # steps measured by this meter (resets on resume, so warmup is skipped again)

    def update(self, step: int, loss: float, lrm: float, dt: float, epoch: int | None = None) -> str:
        """Record one finished optimizer step (step = number of steps done) and return its progress line."""
        self.ema = EMA_BETA * self.ema + (1 - EMA_BETA) * loss
        self.ema_steps += 1
        smooth = self.ema / (1 - EMA_BETA**self.ema_steps)  # debiased: the first value is the raw loss
        self.total_time += dt
        self.steps_seen += 1
        if self.steps_seen > TIMING_WARMUP_STEPS:
            self.timed_time += dt
            self.timed_steps += 1
        parts = [
            f"step {step:05d}/{self.num_iterations:05d} ({100 * step / self.num_iterations:.2f}%)",
            f"loss: {smooth:.4f}",
            f"lrm: {lrm:.2f}",
            f"dt: {dt * 1000:.0f}ms",
            f"tok/sec: {format_count(self.tokens_per_step / dt)}",
        ]
        mfu = self.mfu(dt)
        if mfu is not None:
            parts.append(f"mfu: {mfu:.1f}")
        if epoch is not None:
            parts.append(f"epoch: {epoch}")
        parts.append(f"total time: {self.total_time / 60:.2f}m")
        parts.append(f"eta: {self.eta_seconds(step, dt) / 60:.1f}m")
        return " | ".join(parts)

    def mfu(self, dt: float) -> float | None:
        if self.peak_flops_total is None:
            return None
        return 100 * self.flops_per_token * self.tokens_per_step / dt / self.peak_flops_total

    def eta_seconds(self, step: int, dt: float) -> float:
        per_step = self.timed_time / self.timed_steps if self.timed_steps else dt
        return per_step * max(0, self.num_iterations - step)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "ema_steps": self.ema_steps, "total_time": self.total_time}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.ema_steps, self.total_time = state["ema"], state["ema_steps"], state["total_time"]


class DummyWandb:
    """Stands in for a W&B run when logging is off (--run dummy, or ranks other than 0)."""

    def log(self, *args, **kwargs) -> None:
        return None

    def finish(self) -> None:
        return None


def init_wandb(run: str, config: dict, project: str, master: bool, base_dir: str):
    """A real W&B run on rank 0 unless run == "dummy". WANDB_MODE=offline works (files under base_dir/wandb)."""
    if run == "dummy" or not master:
        return DummyWandb()
    import wandb

    wandb_dir = os.environ.get("WANDB_DIR") or os.path.join(base_dir, "wandb")
    os.makedirs(wandb_dir, exist_ok=True)
    return wandb.init(project=project, name=run, config=config, dir=wandb_dir)


def is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
