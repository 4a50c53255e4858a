"""Saving and loading training checkpoints.

Layout under $NANOCHAT_BASE_DIR (one directory per training phase, one sub-directory per model tag):

    base_checkpoints/d12/model_000500.pt          {"model": GPT state_dict, "aux": {name: state_dict}}
    base_checkpoints/d12/optim_000500_rank0.pt    [optimizer.state_dict() for each optimizer] of rank 0
    base_checkpoints/d12/meta_000500.json         model_config, user_config, step, metrics, dataloader state, ...

Every file is written atomically (temp file + rename), and the meta file is written LAST, after every rank has
written its optimizer shard: a step counts as saved exactly when its meta file exists, so a crash in the middle
of a save leaves the previous checkpoint as the latest one instead of a half-written new one.
"""

import glob
import json
import logging
import os
import re

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from nanochat.common import atomic_open, get_base_dir

logger = logging.getLogger("nanochat")

PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints"}
PHASE_COMMANDS = {"base": "python -m scripts.base_train", "mid": "python -m scripts.mid_train",
                  "sft": "python -m scripts.chat_sft"}
_META_RE = re.compile(r"^meta_(\d+)\.json$")
_TAG_DEPTH_RE = re.compile(r"^d(\d+)")
_COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps the module; its state_dict keys carry this prefix


def model_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir: str, step: int, rank: int) -> str:
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(checkpoint_dir: str, step: int, model_state: dict | None, optimizer_states: list | None,
                    meta: dict, rank: int = 0, aux_states: dict | None = None) -> None:
    """Write one step's checkpoint. Call it on EVERY rank (it synchronizes them before the meta file).

    Rank 0 writes the model (weights plus `aux_states`, e.g. MegaContext's GistNet / LensNet), each rank its own
    optimizer shard (None: no optimizer file), and rank 0 finally the meta JSON.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0:
        if model_state is None:
            raise ValueError("rank 0 must pass the model state to save_checkpoint")
        with atomic_open(model_path(checkpoint_dir, step), "wb") as f:
            torch.save({"model": model_state, "aux": aux_states or {}}, f)
    if optimizer_states is not None:
        with atomic_open(optim_path(checkpoint_dir, step, rank), "wb") as f:
            torch.save(optimizer_states, f)
    _barrier()  # every shard is on disk before the meta file makes the step visible
    if rank == 0:
        payload = json.dumps(meta, indent=2, sort_keys=True)
        with atomic_open(meta_path(checkpoint_dir, step), "w") as f:
            f.write(payload)
        logger.info("saved checkpoint %s step %d", checkpoint_dir, step)
    _barrier()  # nobody races ahead to load a step whose meta is not written yet


def _strip_compile_prefix(state: dict) -> dict:
    return {k.removeprefix(_COMPILE_PREFIX): v for k, v in state.items()}


def load_checkpoint(checkpoint_dir: str, step: int, device, load_optimizer: bool = False, rank: int = 0):
    """(model_state, optimizer_states or None, meta, aux_states) of a saved step; tensors land on `device`."""
    meta_file = meta_path(checkpoint_dir, step)
    if not os.path.exists(meta_file):
        saved = list_steps(checkpoint_dir)
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir} "
                                f"(saved steps: {saved or 'none'})")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    payload = torch.load(model_path(checkpoint_dir, step), map_location=device, weights_only=True)
    model_state = _strip_compile_prefix(payload["model"])
    optimizer_states = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no optimizer shard for rank {rank} at {path}; resume with the number of processes the checkpoint "
                f"was saved with (world_size={meta.get('world_size', 'unknown')})")
        optimizer_states = torch.load(path, map_location=device, weights_only=True)
    return model_state, optimizer_states, meta, payload.get("aux", {})


def list_steps(checkpoint_dir: str) -> list[int]:
    """Steps with a meta file (i.e. completely saved), ascending."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        match = _META_RE.match(os.path.basename(path))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir: str) -> int:
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (meta_*.json) in {checkpoint_dir}")
    return steps[-1]


def find_largest_model(checkpoints_dir: str) -> str:
    """The model tag to load by default: the deepest `d<depth>...` tag that holds a complete checkpoint;
    ties (e.g. d12 and d12_mc) and tags without a depth go by the most recent save."""
    tags = [t for t in sorted(os.listdir(checkpoints_dir)) if list_steps(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise FileNotFoundError(f"no model tags with a complete checkpoint in {checkpoints_dir}")

    def key(tag: str):
        match = _TAG_DEPTH_RE.match(tag)
        depth = int(match.group(1)) if match else -1
        newest = max(os.path.getmtime(p) for p in glob.glob(os.path.join(checkpoints_dir, tag, "meta_*.json")))
        return depth, newest

    return max(tags, key=key)


def checkpoints_dir(source: str) -> str:
    if source not in PHASE_DIRS:
        raise ValueError(f"source must be one of {sorted(PHASE_DIRS)}, got {source!r}")
    return os.path.join(get_base_dir(), PHASE_DIRS[source])


def resolve_checkpoint(source: str, model_tag: str | None = None, step: int | None = None) -> tuple[str, int]:
    """(checkpoint_dir, step) for a phase, defaulting to the largest model and its last step. Errors name the
    command that creates what is missing."""
    root = checkpoints_dir(source)
    hint = f"train one with `{PHASE_COMMANDS[source]}`"
    if model_tag is None:
        if not os.path.isdir(root) or not os.listdir(root):
            raise FileNotFoundError(f"no {source} checkpoints under {root}; {hint}")
        try:
            model_tag = find_largest_model(root)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; {hint}") from None
    checkpoint_dir = os.path.join(root, model_tag)
    if not list_steps(checkpoint_dir):
        tags = sorted(os.listdir(root)) if os.path.isdir(root) else []
        raise FileNotFoundError(f"no complete {source} checkpoint for model tag {model_tag!r} in {checkpoint_dir} "
                                f"(tags present: {tags or 'none'}); {hint}")
    if step is None:
        step = find_last_step(checkpoint_dir)
    return checkpoint_dir, step


class _SkipWeightInit(TorchFunctionMode):
    """Inside this mode the weight initialisers (nn.init.*, Tensor.normal_ / uniform_ / zero_ / fill_ ...) do
    nothing: a model about to receive a checkpoint's weights does not need them."""

    SKIPPED = frozenset([
        nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
        nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.zeros_, nn.init.ones_, nn.init.constant_,
        nn.init.orthogonal_, torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
    ])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:  # return the tensor untouched, as the in-place initialisers return it
            return args[0] if args else kwargs["tensor"]  # nn.init passes it by keyword
        return func(*args, **kwargs)


def build_model(model_state: dict, meta: dict, device, phase: str):
    """A GPT built from meta["model_config"] with the saved weights, on `device`, in eval or train mode.

    The model is allocated on `device` with its initialisers skipped, then the weights are copied in. (Not on the
    meta device: meta tensors' random and arange ops run through torch._refs, whose first call imports the whole
    compiler stack, torch._dynamo and sympy: seconds before a one-shot `chat_cli -p` could print anything.)"""
    from nanochat.gpt import GPT, GPTConfig

    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    config = GPTConfig(**meta["model_config"])
    with torch.device(device), _SkipWeightInit():
        model = GPT(config)  # memory allocated, weights not initialised; the derived rotary tables are computed
    model.load_state_dict(model_state, strict=True)  # strict: every weight and persistent buffer is overwritten
    model.train(phase == "train")
    return model


def load_model(source: str, device, phase: str = "eval", model_tag: str | None = None, step: int | None = None):
    """(model, tokenizer, meta) of a trained checkpoint: "base" | "mid" | "sft"; latest tag and step by default."""
    model, tokenizer, meta, *_ = load_model_and_aux(source, device, phase, model_tag, step)
    return model, tokenizer, meta


def load_model_and_aux(source: str, device, phase: str = "eval", model_tag: str | None = None,
                       step: int | None = None):
    """`load_model`, plus what else the checkpoint holds and where it came from:
    (model, tokenizer, meta, aux_states, checkpoint_dir, step). aux_states carries e.g. MegaContext's nets."""
    from nanochat.tokenizer import get_tokenizer

    checkpoint_dir, step = resolve_checkpoint(source, model_tag, step)
    model_state, _, meta, aux_states = load_checkpoint(checkpoint_dir, step, device)
    model = build_model(model_state, meta, device, phase)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the checkpoint in "
                         f"{checkpoint_dir} was trained with vocab_size={model.config.vocab_size}; the tokenizer "
                         "was retrained after this model: retrain the model or restore that tokenizer")
    return model, tokenizer, meta, aux_states, checkpoint_dir, step
