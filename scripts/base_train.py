"""Pretrain the base GPT on the parquet corpus.

    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --total-batch-size=512 \\
        --num-iterations=20 --core-metric-every=-1                       # a few CPU steps
    python -m scripts.base_train --depth=12 --device-batch-size=8      # one GPU, horizon from the data:param ratio
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24 --target-param-data-ratio=12
    python -m scripts.base_train ... --resume-from-step=400            # continue a run from its checkpoint
    python -m scripts.base_train ... --resume-from-step=latest         # from the last checkpoint, if there is one

CPU profile for the embedded corpus (run10.sh --gpu cpu): d4, 400 steps × 2048 tokens (0.8M tokens, under one epoch),
val bpb 3.68 -> 2.13, about 5-6 minutes on 2 uncontended cores (~2.9K tok/s); re-running it resumes:

    python -m scripts.base_train --depth=4 --max-seq-len=256 --device-batch-size=8 --total-batch-size=2048 \\
        --num-iterations=400 --warmdown-ratio=0.5 --eval-every=100 --eval-tokens=16384 --sample-every=400 \\
        --save-every=100 --core-metric-every=-1 --resume-from-step=latest

`--depth` is the one dial: width, heads and (unless --num-iterations / --target-flops is given) the number of
steps follow from it. Every flag takes dash or underscore spelling. Each step prints a progress line; val
bits-per-byte is measured every --eval-every steps and at the end, samples are printed every --sample-every,
checkpoints go to $NANOCHAT_BASE_DIR/base_checkpoints/<model_tag>/ every --save-every steps and at the end.
Under torchrun (NCCL on GPUs, gloo on CPU) N processes compute exactly the global batch that one process
computes with N× the gradient accumulation.
"""

import argparse
import dataclasses
import os

import psutil
import torch
import torch.distributed as dist

from megacontext.config import MCConfig, add_mc_args
from megacontext.mc_metrics import progress_note
from megacontext.nets import mc_model_tag
from megacontext.train_wiring import auto_batch, objective_for_run
from nanochat.checkpoint_manager import list_steps, load_checkpoint
from nanochat.common import (
    add_flag,
    autocast_context,
    compute_cleanup,
    compute_init,
    device_type_flag,
    get_base_dir,
    print0,
    resolve_device_type,
    str2bool,
    strip_separator,
)
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import PretrainLoader, build_val_batches, merge_states
from nanochat.gpt import GPT, GPTConfig
from nanochat.grad_sync import all_reduce_gradients
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.run_state import (
    add_optimizer_flags,
    gather_objects,
    restore_optimizer_states,
    save_run_checkpoint,
    setup_optimizers,
)
from nanochat.stage_loop import LossLog, StepResult, due, run_steps
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.train_loop import (
    ProgressMeter,
    apply_schedules,
    grad_accum_steps,
    init_wandb,
    lr_multiplier,
    muon_momentum,
    peak_flops,
    training_horizon,
)

GPU_EVAL_TOKENS = 20 * 524288  # nanochat's default validation budget on GPUs
CPU_EVAL_TOKENS = 65536  # a CPU can afford far less; both are capped by what the val split holds
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then "
                  "tomorrow will be", "The opposite of hot is", "To be, or not to be,", "My lord, I"]
SAMPLE_TOKENS = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.base_train", description="Pretrain the base model.")
    add_flag(p, "--run", default="dummy", help="W&B run name ('dummy' = no W&B; WANDB_MODE=offline works)")
    add_flag(p, "--device-type", type=device_type_flag, default="", help="cuda | cpu | mps (default: autodetect)")
    add_flag(p, "--depth", type=int, default=20, help="number of transformer layers; sets width and heads too")
    add_flag(p, "--max-seq-len", type=int, default=2048, help="tokens per row (context length)")
    add_flag(p, "--device-batch-size", type=int, default=32, help="rows per forward/backward per process")
    add_flag(p, "--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all processes")
    add_flag(p, "--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the next two flags)")
    add_flag(p, "--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: off)")
    add_flag(p, "--target-param-data-ratio", type=float, default=20.0, help="training tokens per parameter")
    add_optimizer_flags(p)
    add_flag(p, "--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear LR warmup")
    add_flag(p, "--warmdown-ratio", type=float, default=0.2, help="fraction of steps with linear LR decay")
    add_flag(p, "--final-lr-frac", type=float, default=0.0, help="LR at the end, as a fraction of the initial")
    add_flag(p, "--eval-every", type=int, default=250, help="val bpb every N steps (-1: only at the end)")
    add_flag(p, "--eval-tokens", type=int, default=None,
             help=f"val tokens per evaluation (default {GPU_EVAL_TOKENS} on CUDA, {CPU_EVAL_TOKENS} otherwise, "
                  "capped by the val split)")
    add_flag(p, "--core-metric-every", type=int, default=2000, help="CORE metric every N steps and at the end "
             "(-1: off)")
    add_flag(p, "--core-metric-max-per-task", type=int, default=500, help="CORE examples per task")
    add_flag(p, "--sample-every", type=int, default=2000, help="print samples every N steps and at the end (-1: off)")
    add_flag(p, "--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    add_flag(p, "--resume-from-step", type=resume_step, default=-1,
             help="continue from this saved step (-1: fresh run; 'latest': the last saved step if any, else fresh)")
    add_flag(p, "--model-tag", default=None, help="checkpoint sub-directory (default d<depth>)")
    add_flag(p, "--compile", type=str2bool, default=None, help="torch.compile the model: 1|0 (default 1 on CUDA)")
    add_flag(p, "--seed", type=int, default=42, help="seed of the weight init")
    add_flag(p, "--loss-log", default=None, help="append one JSON line per step (loss, lrm, dt) and eval to PATH")
    add_mc_args(p)
    add_flag(p, "--recall-mix", type=float, default=0.0,
             help="fraction of the training text, in pieces of 1/8 to 1/2 of --max-seq-len, turned into synthetic "
                  "passkey / associative-recall documents built on those pieces (teaches long-range recall; 0: off)")
    argv = strip_separator(argv)  # `torchrun ... -m scripts.X -- --flags`
    args = p.parse_args(argv)
    for name in ("depth", "max_seq_len", "device_batch_size", "total_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def resume_step(value: str) -> int | str:
    if value == "latest":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or 'latest', got {value!r}") from None


def resolve_resume_step(requested: int | str, checkpoint_dir: str) -> int:
    """The step to resume from, or -1 for a fresh run."""
    if requested != "latest":
        return requested
    steps = list_steps(checkpoint_dir)
    if not steps:
        print0(f"--resume-from-step=latest: no checkpoint in {checkpoint_dir} yet, starting fresh")
        return -1
    return steps[-1]


def build_model(args, vocab_size: int, device: torch.device) -> GPT:
    config = GPTConfig.from_depth(args.depth, vocab_size=vocab_size, sequence_len=args.max_seq_len)
    with torch.device("meta"):
        model = GPT(config)  # shapes only; the weights are created on the target device below
    model.to_empty(device=device)
    model.init_weights()
    return model


def eval_steps(args, world_size: int, device_type: str) -> tuple[int, bool]:
    """(val batches per rank, whether the value was the automatic default and may be capped)."""
    per_step = args.device_batch_size * args.max_seq_len * world_size
    auto = args.eval_tokens is None
    tokens = (GPU_EVAL_TOKENS if device_type == "cuda" else CPU_EVAL_TOKENS) if auto else args.eval_tokens
    if tokens < per_step:
        raise ValueError(f"--eval-tokens={tokens} is less than one val batch of device_batch_size × max_seq_len × "
                         f"world_size = {per_step} tokens; raise it")
    return tokens // per_step, auto


def load_val_batches(args, tokenizer, dist_info, device_type) -> list:
    steps, auto = eval_steps(args, dist_info.world_size, device_type)
    batches, available = build_val_batches(tokenizer, args.device_batch_size, args.max_seq_len, steps,
                                           dist_info.rank, dist_info.world_size)
    per_rank = available // dist_info.world_size
    if per_rank < steps:
        tokens = args.device_batch_size * args.max_seq_len * dist_info.world_size
        if not auto or per_rank == 0:
            raise ValueError(f"the val split holds {available} batches of {args.device_batch_size}×{args.max_seq_len} "
                             f"tokens but {steps * dist_info.world_size} were asked for; lower --eval-tokens to at "
                             f"most {per_rank * tokens} (or use smaller batches / more val data)")
        print0(f"val split holds {per_rank * tokens:,} tokens: evaluating on all of them")
    return batches


def sample(model, tokenizer, device_type) -> list[str]:
    bos = tokenizer.get_bos_token_id()
    lines = []
    with autocast_context(device_type):
        for prompt in SAMPLE_PROMPTS:
            tokens = tokenizer.encode(prompt, prepend=bos)
            out = list(model.generate(tokens, max_tokens=SAMPLE_TOKENS, temperature=0.0))
            lines.append(tokenizer.decode(tokens[1:] + out))
    return lines


def gather_loader_state(loader: PretrainLoader, ddp: bool) -> dict:
    return merge_states(gather_objects(loader.state_dict(), ddp))


def resume(step, checkpoint_dir, model, optimizers, dist_info) -> tuple[dict, dict]:
    """Load weights, this rank's optimizer shard and the run state of a saved step; return its (meta, aux states)."""
    model_state, optim_states, meta, aux = load_checkpoint(checkpoint_dir, step, dist_info.device,
                                                         load_optimizer=True, rank=dist_info.rank)
    if meta["model_config"] != dataclasses.asdict(model.config):
        raise ValueError(f"checkpoint step {step} in {checkpoint_dir} has model config "
                         f"{meta['model_config']}, but the flags build {dataclasses.asdict(model.config)}; resume "
                         "with the same --depth / --max-seq-len and tokenizer")
    model.load_state_dict(model_state, strict=True)
    restore_optimizer_states(optimizers, optim_states)
    return meta, aux


def memory_summary(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"
    return f"process RSS {psutil.Process().memory_info().rss / 2**20:,.0f} MiB"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device_type = resolve_device_type(args.device_type)
    dist_info = compute_init(device_type, seed=args.seed)
    summary = train(args, dist_info)
    compute_cleanup()
    return summary


@dataclasses.dataclass
class Run:
    """Everything one training run carries from step to step."""

    args: argparse.Namespace
    dist: object  # nanochat.common.DistInfo
    tokenizer: object
    model: GPT
    train_model: torch.nn.Module  # `model`, or its torch.compile wrapper (same parameters)
    optimizers: list
    objective: object  # megacontext.controller: VanillaObjective, or MCController under --mc
    params: list  # every trained parameter: the model's and the objective's
    loader: PretrainLoader
    meter: ProgressMeter
    accum: int
    num_iterations: int
    start_step: int
    checkpoint_dir: str
    wandb_run: object
    loss_log: LossLog
    token_bytes: torch.Tensor
    val_bpb: float | None = None
    min_val_bpb: float | None = None
    core_metric: float | None = None
    val_batches: list | None = None
    losses: list = dataclasses.field(default_factory=list)
    samples: list = dataclasses.field(default_factory=list)


def setup(args, dist_info) -> Run:
    device = dist_info.device
    mc_cfg = MCConfig.from_args(args)
    tokenizer = get_tokenizer()
    model = build_model(args, tokenizer.get_vocab_size(), device)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    num_iterations, horizon_source = training_horizon(args.num_iterations, args.target_flops,
                                                      args.target_param_data_ratio, num_params, flops_per_token,
                                                      args.total_batch_size)
    plan = auto_batch(mc_cfg, args.device_batch_size, num_iterations)  # --mc_auto_batch; a no-op without --mc
    args.device_batch_size, num_iterations = plan.device_batch_size, plan.num_iterations
    if plan.message:
        print0(plan.message)
    accum = grad_accum_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len, dist_info.world_size)
    optimizers = setup_optimizers(model, args)
    use_compile = dist_info.device_type == "cuda" if args.compile is None else args.compile
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    objective, _ = objective_for_run(mc_cfg, model, train_model, num_iterations, args.seed, args.mc_telemetry_jsonl)
    optimizers += objective.optimizers
    tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", mc_model_tag(tag) if mc_cfg.mc else tag)
    peak = peak_flops(device)
    meter = ProgressMeter(num_iterations, args.total_batch_size, flops_per_token,
                          None if peak is None else peak * dist_info.world_size)
    start_step, loader_state, val_bpb, min_val_bpb = 0, None, None, None
    resume_from = resolve_resume_step(args.resume_from_step, checkpoint_dir)
    if resume_from >= 0:
        meta, aux = resume(resume_from, checkpoint_dir, model, optimizers, dist_info)
        if mc_cfg.mc and not objective.load_checkpoint_parts(meta, aux):
            raise ValueError(f"{checkpoint_dir} step {resume_from} has no MegaContext nets; resume it without --mc")
        start_step, loader_state, val_bpb = meta["step"], meta["dataloader_state"], meta["val_bpb"]
        min_val_bpb = meta["loop_state"]["min_val_bpb"]
        meter.load_state_dict(meta["loop_state"]["progress"])
        if start_step > num_iterations:
            raise ValueError(f"checkpoint step {start_step} is past this run's horizon of {num_iterations} steps; "
                             "raise --num-iterations (or use a fresh --model-tag)")
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    loader = PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, device, "train", dist_info.rank,
                            dist_info.world_size, accum, state=loader_state, recall_mix=args.recall_mix)

    print0(f"model d{args.depth}: {num_params:,} params, width {model.config.n_embd}, {model.config.n_head} heads, "
           f"vocab {model.config.vocab_size}, {flops_per_token:.3e} FLOPs/token")
    print0(f"batch: {args.total_batch_size:,} tokens/step = {args.device_batch_size} rows × {args.max_seq_len} "
           f"tokens × {dist_info.world_size} processes × {accum} accumulation steps")
    print0(f"horizon: {num_iterations:,} steps ({horizon_source}); {num_iterations * args.total_batch_size:,} tokens, "
           f"{num_iterations * args.total_batch_size / num_params:.2f} tokens/param; compile={int(use_compile)}")
    return Run(args=args, dist=dist_info, tokenizer=tokenizer, model=model, train_model=train_model,
               optimizers=optimizers, objective=objective, params=list(model.parameters()) + objective.parameters(),
               loader=loader, meter=meter, accum=accum, num_iterations=num_iterations,
               start_step=start_step, checkpoint_dir=checkpoint_dir,
               wandb_run=init_wandb(args.run, vars(args).copy(), "nanochat", dist_info.is_master, get_base_dir()),
               loss_log=LossLog(args.loss_log, dist_info.is_master), token_bytes=get_token_bytes(device),
               val_bpb=val_bpb, min_val_bpb=min_val_bpb)


def run_eval(run: Run, step: int) -> None:
    if run.val_batches is None:
        run.val_batches = load_val_batches(run.args, run.tokenizer, run.dist, run.dist.device_type)
    run.model.eval()
    with autocast_context(run.dist.device_type):
        run.val_bpb = evaluate_bpb(run.train_model, run.val_batches, len(run.val_batches), run.token_bytes)
        mc_val = run.objective.evaluate(run.val_batches, step)  # {} without --mc
    run.model.train()
    run.min_val_bpb = run.val_bpb if run.min_val_bpb is None else min(run.min_val_bpb, run.val_bpb)
    print0(f"step {step:05d} | val bpb: {run.val_bpb:.4f}" + progress_note(mc_val, "mc_val/"))
    run.wandb_run.log({"step": step, "val/bpb": run.val_bpb, **mc_val})
    run.loss_log.write(step=step, val_bpb=run.val_bpb, **mc_val)


def save_step(run: Run, step: int) -> None:
    """Checkpoint on every rank (each writes its optimizer shard); rank 0 writes weights and meta."""
    aux, mc_meta = run.objective.checkpoint_parts()  # MC nets and their config ({} without --mc)
    save_run_checkpoint(run.checkpoint_dir, step, run.model, run.optimizers, run.dist, {
        "user_config": vars(run.args), "val_bpb": run.val_bpb,
        "dataloader_state": gather_loader_state(run.loader, run.dist.ddp),
        "loop_state": {"progress": run.meter.state_dict(), "min_val_bpb": run.min_val_bpb}, **mc_meta},
        aux_states=aux)
    print0(f"saved checkpoint {run.checkpoint_dir} step {step}")


def run_evals(run: Run, step: int, last: bool) -> None:
    """Everything due at `step`: val bpb, CORE, samples (rank 0)."""
    args, dist_info = run.args, run.dist
    if due(step, args.eval_every, last):
        run_eval(run, step)
    if args.core_metric_every > 0 and due(step, args.core_metric_every, last, at_zero=False):
        result = evaluate_core(run.model, run.tokenizer, dist_info.device, max_per_task=args.core_metric_max_per_task)
        run.core_metric = float(result["core_metric"])
        print0(f"step {step:05d} | CORE metric: {run.core_metric:.4f}")
        run.wandb_run.log({"step": step, "core_metric": run.core_metric})
    if dist_info.is_master and args.sample_every > 0 and due(step, args.sample_every, last, at_zero=False):
        run.samples = sample(run.model, run.tokenizer, dist_info.device_type)
        print0("\n".join(f"  sample: {s!r}" for s in run.samples))


def train(args, dist_info) -> dict:
    run = setup(args, dist_info)
    run.losses = run_steps(
        start_step=run.start_step, num_iterations=run.num_iterations, save_every=args.save_every, meter=run.meter,
        wandb_run=run.wandb_run, evaluate=lambda step, last: run_evals(run, step, last),
        save=lambda step: save_step(run, step), step=lambda step: train_step(args, step, run),
        after_step=lambda step, r, dt: run.loss_log.write(step=step, loss=r.loss, lrm=r.lrm, dt=dt, **r.logs))
    return finish(run)


def finish(run: Run) -> dict:
    args, device, num_params = run.args, run.dist.device, run.model.num_params()
    memory = memory_summary(device)
    print0(f"done: {run.meter.total_time / 60:.2f}m of training, {memory}, min val bpb {run.min_val_bpb:.4f}")
    get_report().log("Base model training", [
        vars(args),
        {"parameters": num_params, "flops_per_token": run.model.estimate_flops(),
         "num_iterations": run.num_iterations, "tokens": run.num_iterations * args.total_batch_size,
         "world_size": run.dist.world_size, "grad_accum_steps": run.accum},
        {"min_val_bpb": run.min_val_bpb, "final_val_bpb": run.val_bpb, "core_metric": run.core_metric,
         "training_time_min": run.meter.total_time / 60, "memory": memory},
    ])
    run.wandb_run.finish()
    return {"losses": run.losses, "val_bpb": run.val_bpb, "min_val_bpb": run.min_val_bpb,
            "step": run.num_iterations, "checkpoint_dir": run.checkpoint_dir, "samples": run.samples}


def train_step(args, step: int, run: Run) -> StepResult:
    """One optimizer step over `accum` micro-batches; the loss is averaged over all ranks."""
    lrm = lr_multiplier(step, run.num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    apply_schedules(run.optimizers, lrm, muon_momentum(step))
    loss_sum = torch.zeros((), device=run.dist.device)
    for _ in range(run.accum):
        x, y, _ = next(run.loader)  # (B, T) each
        with autocast_context(run.dist.device_type):
            objective, loss = run.objective(x, y, step)  # objective = loss without --mc
        loss_sum += loss.detach()
        (objective / run.accum).backward()  # sum of micro-batch means / accum = the mean of one big batch
    all_reduce_gradients(run.params)  # every rank now holds the global batch's mean gradient
    run.objective.end_step()
    clip = args.grad_clip if args.grad_clip > 0 else float("inf")  # inf: measure the norm, clip nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)  # as without --mc
    for group in run.objective.clip_groups():  # each MC net on its own
        torch.nn.utils.clip_grad_norm_(group, clip)
    for opt in run.optimizers:
        opt.step()
    for p in run.params:
        p.grad = None
    loss_avg = loss_sum / run.accum
    if run.dist.ddp:
        dist.all_reduce(loss_avg, op=dist.ReduceOp.SUM)
        loss_avg /= run.dist.world_size
    loss_value, grad_norm_value = loss_avg.item(), grad_norm.item()  # .item() waits for the GPU: dt is honest
    mc = run.objective.step_metrics()  # {} without --mc
    return StepResult(loss_value, lrm, grad_norm_value, epoch=run.loader.epoch, logs=mc, note=progress_note(mc))


if __name__ == "__main__":
    main()
