"""A tiny chat checkpoint that carries MegaContext nets (tag `d1_mc`), next to its vanilla twin (`d1`).

Both hold the same GPT weights (from chat_fixtures.make_tiny_checkpoint, short window `SEQ`), so MC output can be
compared with vanilla output. The MC nets are fresh except LensNet's score head, which gets random weights so the
allocator has opinions and the focus actually moves (a fresh head scores every entry 0).
"""

import os
from contextlib import contextmanager

import pytest
import torch
from chat_fixtures import make_tiny_checkpoint

from megacontext.config import MCConfig
from megacontext.nets import MCNets
from nanochat.checkpoint_manager import PHASE_DIRS, load_checkpoint, save_checkpoint
from nanochat.gpt import GPT, GPTConfig

SEQ = 64
MC_TAG = "d1_mc"


def make_tiny_mc_checkpoint(base_dir: str, *, source: str = "sft", stop: str = "never", max_lod: int = 3) -> str:
    vanilla_dir = make_tiny_checkpoint(base_dir, stop=stop, source=source, sequence_len=SEQ)
    model_state, _, meta, _ = load_checkpoint(vanilla_dir, 1, torch.device("cpu"))
    model = GPT(GPTConfig(**meta["model_config"]))
    model.load_state_dict(model_state)
    cfg = MCConfig(mc=True, block_size=4, mc_max_lod=max_lod, gistnet_layers=1, lensnet_layers=1).resolve(SEQ)
    torch.manual_seed(5)
    nets = MCNets.for_model(cfg, model)
    with torch.no_grad():
        nets.lensnet.head.weight.normal_(0.0, 2.0)
    aux, meta_extra = nets.checkpoint_parts()
    checkpoint_dir = os.path.join(base_dir, PHASE_DIRS[source], MC_TAG)
    save_checkpoint(checkpoint_dir, 1, model.state_dict(), None, {**meta, **meta_extra}, aux_states=aux)
    return checkpoint_dir


@contextmanager
def mc_base_dir(tmp_path_factory, name: str):
    """A base dir holding the tiny MC checkpoint, set as $NANOCHAT_BASE_DIR (no W&B, no telemetry) while open."""
    base = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        mp.delenv("RANK", raising=False)
        mp.delenv("WANDB_RUN", raising=False)
        mp.setenv("MC_TELEMETRY", "none")
        make_tiny_mc_checkpoint(str(base))
        yield str(base)
