"""GistNet: compress K vectors of the base model's embedding space into one vector of the same space.

`GistNet(cfg)(children: Float[N, K, D], level) -> Float[N, D]`. Level-1 gists compress K token embeddings, level-2
gists compress K level-1 gists, and so on; a learned level embedding tells the one shared net
which level it is building, so a single set of weights serves the whole tree.

Architecture (width D = the base model's n_embd, so no projection in or out is needed):
    rms_norm(children) + within-block position embedding + level embedding      (N, K, D)
    -> `n_layer` bidirectional encoder blocks                                    (N, K[+1], D)
    -> pooling: mean | query (one learned query cross-attends) | cls (a learned token prepended)   (N, D)
    -> head: mlp (residual relu² MLP) | linear (a D x D map)                    (N, D)
    -> rms_norm, then rescaled to the RMS of the children                        (N, D)

A fresh net is close to "mean of the children": residual branches start at zero, the linear head starts at the
identity, and the mlp head is residual. That is a sensible, already-useful gist (mean pooling is also the
parameter-free `--gistnet_type mean` baseline), and the LM loss trains it from there.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from megacontext.blocks import MLP, Attention, EncoderBlock, count_params, rms_norm
from megacontext.config import HEADS, POOLINGS


@dataclass
class GistNetConfig:
    d_model: int  # D: the base model's embedding width; gists live in that space
    block_size: int = 32  # K: children per gist
    n_layer: int = 2  # --gistnet_layers
    n_head: int = 4
    pooling: str = "mean"  # mean | query | cls
    head: str = "mlp"  # mlp | linear
    max_level: int = 2  # highest gist level built (--mc_max_lod); levels 1..max_level
    mlp_ratio: int = 4

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"gistnet pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.head not in HEADS:
            raise ValueError(f"gistnet head must be one of {HEADS}, got {self.head!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"gistnet width {self.d_model} must be divisible by n_head={self.n_head}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (got {self.block_size}); use 8, 32 or 128")
        if self.max_level < 1 or self.n_layer < 0:
            raise ValueError(f"need max_level >= 1 and n_layer >= 0 (got {self.max_level}, {self.n_layer})")
        if self.pooling == "cls" and self.n_layer < 1:
            raise ValueError("cls pooling needs n_layer >= 1: without attention the CLS token never sees the children")


def mean_gists(children: torch.Tensor) -> torch.Tensor:
    """The parameter-free baseline (`--gistnet_type mean`, the MegaContext run a learned GistNet must beat): the mean of the
    children, rescaled to their RMS like GistNet's output. Float[N, K, D] -> Float[N, D]."""
    target_rms = children.float().square().mean(dim=(1, 2)).sqrt()  # (N,)
    return (rms_norm(children.float().mean(dim=1)) * target_rms[:, None]).to(children.dtype)


class GistNet(nn.Module):
    def __init__(self, cfg: GistNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, K = cfg.d_model, cfg.block_size
        self.pos_emb = nn.Parameter(torch.randn(K, D) * 0.1)  # which slot of the block a child sits in
        self.level_emb = nn.Embedding(cfg.max_level, D)  # row L-1 conditions the build of level-L gists
        nn.init.normal_(self.level_emb.weight, std=0.1)
        # Bidirectional on purpose. With a causal mask, a CLS token prepended at position 0 could attend only to
        # itself, so its output would be a function of the learned CLS vector alone: every gist of a level would
        # be the same constant vector whatever the children. Mean/query pooling would still work causally, but
        # early children would never see later ones, an asymmetry a block summary has no reason to have.
        self.blocks = nn.ModuleList([EncoderBlock(D, cfg.n_head, cfg.mlp_ratio) for _ in range(cfg.n_layer)])
        if cfg.pooling == "cls":
            self.cls = nn.Parameter(torch.randn(D) * 0.1)
        elif cfg.pooling == "query":
            # Attention pooling with one learned query (Set Transformer's PMA / a one-latent Perceiver read).
            self.query = nn.Parameter(torch.randn(D) * 0.1)
            self.pool_attn = Attention(D, cfg.n_head, zero_init_out=False)
            with torch.no_grad():  # values and output start as the identity: a fresh query pool is a weighted mean
                self.pool_attn.kv.weight[D:].copy_(torch.eye(D))
                self.pool_attn.out.weight.copy_(torch.eye(D))
        if cfg.head == "mlp":
            self.head_mlp = MLP(D, cfg.mlp_ratio)  # residual, zero-initialised output: identity at init
        else:
            self.head_linear = nn.Linear(D, D, bias=False)
            nn.init.eye_(self.head_linear.weight)

    def num_params(self) -> int:
        return count_params(self)

    def forward(self, children: torch.Tensor, level: torch.Tensor | int) -> torch.Tensor:
        """children: Float[N, K, D] (K = block_size, D = d_model); level: Long[N] or int, the level of the gists
        being built (1 = from tokens). Returns Float[N, D] gists in the children's dtype."""
        N = self._check_children(children)
        level_idx = self._level_index(level, N, children.device)  # (N,)
        # Per-gist target scale, detached: the RMS of the children it replaces (token embeddings at level 1).
        target_rms = children.float().square().mean(dim=(1, 2)).sqrt().detach()  # (N,)
        lvl = self.level_emb(level_idx).to(children.dtype)  # (N, D)
        x = rms_norm(children) + self.pos_emb.to(children.dtype) + lvl[:, None, :]  # (N, K, D)
        if self.cfg.pooling == "cls":
            cls = (self.cls.to(children.dtype) + lvl)[:, None, :]  # (N, 1, D)
            x = torch.cat([cls, x], dim=1)  # (N, 1 + K, D)
        for block in self.blocks:
            x = block(x)
        pooled = self._pool(x)  # (N, D)
        h = pooled + self.head_mlp(rms_norm(pooled)) if self.cfg.head == "mlp" else self.head_linear(pooled)
        # The gist stands in for token embeddings wherever those are consumed: the base model (which RMS-norms its
        # inputs, but adds the level embedding before that norm), LensNet and the next GistNet level. Matching the
        # scale of what it replaces keeps a gist in-distribution for all of them, and tracks the embedding table as
        # it trains instead of freezing a constant.
        return (rms_norm(h).float() * target_rms[:, None]).to(children.dtype)

    def forward_sequence(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Compress every complete block of a sequence: Float[B, T, D] with T % K == 0 -> Float[B, T // K, D]."""
        B, T, D = x.shape
        K = self.cfg.block_size
        if T % K != 0:
            raise ValueError(f"sequence length {T} is not a multiple of block_size {K}; pass only complete blocks")
        return self(x.reshape(B * (T // K), K, D), level).view(B, T // K, D)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.pooling == "mean":
            return x.mean(dim=1)
        if self.cfg.pooling == "cls":
            return x[:, 0]
        q = self.query.to(x.dtype).expand(x.size(0), 1, -1)  # (N, 1, D)
        return self.pool_attn(q, rms_norm(x))[:, 0]

    def _check_children(self, children: torch.Tensor) -> int:
        K, D = self.cfg.block_size, self.cfg.d_model
        if children.dim() != 3 or children.size(1) != K or children.size(2) != D:
            raise ValueError(f"GistNet expects children Float[N, {K}, {D}], got {tuple(children.shape)}")
        return children.size(0)

    def _level_index(self, level: torch.Tensor | int, N: int, device: torch.device) -> torch.Tensor:
        if isinstance(level, int):
            if not 1 <= level <= self.cfg.max_level:
                raise ValueError(f"gist level must be in 1..{self.cfg.max_level}, got {level}")
            return torch.full((N,), level - 1, dtype=torch.long, device=device)
        if level.shape != (N,):
            raise ValueError(f"level must be an int or Long[{N}], got shape {tuple(level.shape)}")
        # No range check on tensors: it would cost a device sync; nn.Embedding rejects out-of-range rows itself.
        return level.to(device=device, dtype=torch.long) - 1
