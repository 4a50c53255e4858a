"""MCNets: the trainable MegaContext networks as one module, and how they travel inside a checkpoint.

Training, inference and evaluation all build the same three nets from an `MCConfig` and the base model's width:
- `gistnet`: compresses K children into one gist (None with `--gistnet_type mean`: parameter-free mean pooling);
- `lensnet`: scores working-context entries (> 0 expand, < 0 collapse);
- `level_embedding`: tells the base model which entries are gists, and of which level.

Checkpoint contract (shared by base / mid / SFT checkpoints, the Engine and mc_eval):
- the nets' weights are the `"mc"` entry of the checkpoint's aux states (`save_checkpoint(..., aux_states=...)`),
- the resolved config is `meta["mc_config"]` (`MCConfig.to_dict()`),
- MC runs save under their own model tag (`d<depth>_mc`), so they never overwrite a vanilla checkpoint.
"""

import torch
import torch.nn as nn

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet, GistNetConfig, mean_gists
from megacontext.lensnet import LensNet, LensNetConfig
from megacontext.positions import LevelEmbedding

AUX_KEY = "mc"
META_KEY = "mc_config"
MODEL_TAG_SUFFIX = "_mc"


def mc_model_tag(model_tag: str) -> str:
    """The tag an MC run saves under: vanilla `d4` -> `d4_mc` (already-suffixed tags are kept)."""
    return model_tag if model_tag.endswith(MODEL_TAG_SUFFIX) else model_tag + MODEL_TAG_SUFFIX


class MCNets(nn.Module):
    def __init__(self, cfg: MCConfig, d_model: int, n_head: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.d_model = d_model
        self.gistnet = None
        if cfg.gistnet_type == "transformer":
            self.gistnet = GistNet(GistNetConfig(
                d_model=d_model, block_size=cfg.block_size, n_layer=cfg.gistnet_layers, n_head=n_head,
                pooling=cfg.gistnet_pooling, head=cfg.gistnet_head, max_level=cfg.mc_max_lod))
        self.lensnet = LensNet(LensNetConfig(
            d_model=d_model, n_layer=cfg.lensnet_layers, block_size=cfg.block_size, max_level=cfg.mc_max_lod,
            head=cfg.lensnet_head))
        self.level_embedding = LevelEmbedding(cfg.mc_max_lod, d_model)

    @classmethod
    def for_model(cls, cfg: MCConfig, model) -> "MCNets":
        """Nets sized for a GPT, on the GPT's device."""
        nets = cls(cfg, model.config.n_embd, model.config.n_head)
        return nets.to(model.get_device())

    def gist(self, level: int, blocks: torch.Tensor) -> torch.Tensor:
        """The tree's `gist_fn`: Float[N, K, D] children -> Float[N, D] gists of `level` (1 = from tokens)."""
        if self.gistnet is None:
            return mean_gists(blocks)
        return self.gistnet(blocks, level)

    def load_saved(self, state: dict) -> None:
        """Load the nets of a checkpoint (strict). Nets saved by another version of these networks (a parameter
        added or removed since) get an error that names the keys and what to do, not a bare state-dict mismatch."""
        own, saved = set(self.state_dict()), set(state)
        missing, unexpected = sorted(own - saved), sorted(saved - own)
        if missing or unexpected:
            raise ValueError(f"this checkpoint's MegaContext nets do not match this version of the networks "
                             f"(missing {missing or 'none'}, unexpected {unexpected or 'none'}): they were saved by "
                             "another version; retrain with --mc, or continue its base model with fresh MC nets")
        self.load_state_dict(state, strict=True)

    def checkpoint_parts(self) -> tuple[dict, dict]:
        """(aux_states entries, meta entries) to merge into a checkpoint."""
        return {AUX_KEY: self.state_dict()}, {META_KEY: self.cfg.to_dict()}


def has_mc_nets(meta: dict, aux_states: dict) -> bool:
    return META_KEY in meta and AUX_KEY in aux_states


def load_mc_nets(meta: dict, aux_states: dict, model) -> MCNets:
    """The MC nets saved with a checkpoint, on the model's device. A clear error when the checkpoint has none."""
    if not has_mc_nets(meta, aux_states):
        raise ValueError("this checkpoint has no MegaContext nets (it was trained without --mc); train with --mc, "
                         "or run without --mc")
    nets = MCNets.for_model(MCConfig.from_dict(meta[META_KEY]), model)
    nets.load_saved(aux_states[AUX_KEY])
    return nets
