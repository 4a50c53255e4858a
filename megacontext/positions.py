"""Rotary positions for working-context entries, and the level embedding that marks gists.

A working context (WC) is a row of nodes `(level, index)`; node (L, i) covers tokens [i·K^L, (i+1)·K^L). The base
model needs one rotary position per entry. Three schemes, behind one flag, to be measured against each other:

- `wc`: the entry's index in the WC, 0..W-1. Positions never exceed W_max, whatever the history length, so a model
  trained at max_seq_len sees only positions it was trained on. Gaps in token space are invisible.
- `global`: the centre of the entry's span in token space, i·K^L + (K^L - 1)/2. Honest about distances (a gist
  1000 tokens back sits 1000 positions back) and independent of which other entries the WC holds, but the
  positions, and the distances between the tail and old gists, grow with the history.
- `gaussian`: `global`, plus a blur that grows with the span. A gist stands for K^L tokens spread uniformly over
  its span, so its position is really a distribution with std σ = sqrt((K^{2L} - 1) / 12) (a discrete uniform over
  K^L slots; 0 for a raw token, so level 0 is untouched). For a position p + ε with ε ~ N(0, σ²), the expected
  rotary factor is E[cos(θ(p + ε))] = cos(θp)·exp(-θ²σ²/2) (likewise for sin): the characteristic function of a
  Gaussian. So we damp each rotary frequency θ of a gist by exp(-θ²σ²/2): high frequencies (fine position)
  vanish, low ones (coarse position) survive. The same table rotates queries and keys, so a gist–gist score gets
  exp(-θ²(σ_q² + σ_k²)/2), exactly the characteristic function of the difference of two independent blurred
  positions; a token–gist score gets the gist's factor alone. `blur` scales σ (0 turns `gaussian` into `global`).

Tables come out in exactly the form of `nanochat.gpt.rotary_cos_sin` (each Float32[B, W, 1, head_dim // 2]) and
go to `GPT.forward(rotary=...)`; `wc` and `global` are built by that very function.

The level embedding lives here too, not in GistNet: it is part of how a WC is *presented to the base model*
(like positions), while GistNet has its own internal level conditioning for building gists. Row 0 (raw tokens)
is pinned to zero (padding_idx), and gist rows start at zero, so a pure-token WC is fed to the model exactly as
vanilla nanochat feeds it, and an MC run starts from the vanilla model's behaviour.

Shapes: B rows, W entries, D model width, Dh head dim.
"""

import torch
import torch.nn as nn

from megacontext.config import POSITIONAL_SCHEMES
from nanochat.gpt import ROPE_BASE, rotary_cos_sin


def span_lengths(levels: torch.Tensor, block_size: int) -> torch.Tensor:
    """Long[B, W] levels -> Float64[B, W] tokens covered per entry, K^L (fp64: K^L·i stays exact for long histories)."""
    return torch.pow(float(block_size), levels.to(torch.float64))


def span_centres(levels: torch.Tensor, indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """(L, i) -> i·K^L + (K^L - 1)/2, the centre of the span in token space. Float32[B, W]."""
    n = span_lengths(levels, block_size)
    return (indices.to(torch.float64) * n + (n - 1.0) / 2.0).to(torch.float32)


def wc_positions(levels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entry index within the WC, Float32[B, W]. With a key-padding mask (Bool[B, W], True = real entry) the real
    entries are numbered 0, 1, ... whatever padding precedes them (left- or right-padded batches alike)."""
    B, W = levels.shape
    if mask is None:
        return torch.arange(W, device=levels.device, dtype=torch.float32).expand(B, W)
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0).to(torch.float32)


def position_std(levels: torch.Tensor, block_size: int, blur: float = 1.0) -> torch.Tensor:
    """Positional std of an entry, Float32[B, W]: blur · sqrt((K^{2L} - 1) / 12), the std of a uniform position over
    the K^L tokens of the span. Exactly 0 at level 0; strictly increasing in the level."""
    n = span_lengths(levels, block_size)
    return (blur * torch.sqrt((n * n - 1.0) / 12.0)).to(torch.float32)


def entry_positions(levels: torch.Tensor, indices: torch.Tensor, block_size: int, scheme: str,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary position of every WC entry, Float32[B, W]. `gaussian` shares `global`'s centres (its blur lives in
    the table, see `rotary_tables`)."""
    _check_scheme(scheme)
    _check_nodes(levels, indices, mask)
    if scheme == "wc":
        return wc_positions(levels, mask)
    return span_centres(levels, indices, block_size)


def rotary_frequencies(head_dim: int, base: float = ROPE_BASE, device=None) -> torch.Tensor:
    """The angular frequencies θ_j (Float32[head_dim // 2]) that `rotary_cos_sin` uses, read back from its table at
    position 1 (θ_j = atan2(sin θ_j, cos θ_j), exact since every θ_j <= 1 < π) so this module can never drift from
    the base model's definition of rotary."""
    cos, sin = rotary_cos_sin(torch.ones(1, 1, device=device), head_dim, base)
    return torch.atan2(sin, cos).flatten()


def rotary_tables(levels: torch.Tensor, indices: torch.Tensor, block_size: int, scheme: str, head_dim: int,
                  base: float = ROPE_BASE, mask: torch.Tensor | None = None, blur: float = 1.0):
    """(cos, sin), each Float32[B, W, 1, head_dim // 2], ready for `GPT.forward(rotary=...)`."""
    positions = entry_positions(levels, indices, block_size, scheme, mask)  # (B, W)
    cos, sin = rotary_cos_sin(positions, head_dim, base)  # (B, W, 1, Dh/2)
    if scheme != "gaussian":
        return cos, sin
    theta = rotary_frequencies(head_dim, base, device=levels.device)  # (Dh/2,)
    sigma = position_std(levels, block_size, blur)  # (B, W)
    damping = torch.exp(-0.5 * (theta * sigma[..., None]).square())[:, :, None, :]  # (B, W, 1, Dh/2); 1 at level 0
    return cos * damping, sin * damping


class LevelEmbedding(nn.Module):
    """Learned per-level vector added to WC entry embeddings before the base model: Long[B, W] -> Float[B, W, D]."""

    def __init__(self, max_level: int, d_model: int):
        super().__init__()
        if max_level < 0:
            raise ValueError(f"max_level must be >= 0, got {max_level}")
        self.emb = nn.Embedding(max_level + 1, d_model, padding_idx=0)
        nn.init.zeros_(self.emb.weight)  # start as a no-op; padding_idx keeps row 0 at zero and without gradient

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        return self.emb(levels)

    def apply_to(self, embeds: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Float[B, W, D] entry embeddings + their level vectors (level-0 entries unchanged)."""
        return embeds + self.emb(levels).to(embeds.dtype)


def _check_scheme(scheme: str) -> None:
    if scheme not in POSITIONAL_SCHEMES:
        raise ValueError(f"position scheme must be one of {POSITIONAL_SCHEMES}, got {scheme!r}")


def _check_nodes(levels: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None) -> None:
    if levels.dim() != 2 or levels.shape != indices.shape:
        raise ValueError(f"levels and indices must both be Long[B, W], got {tuple(levels.shape)} and "
                         f"{tuple(indices.shape)}")
    if mask is not None and (mask.shape != levels.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be Bool{list(levels.shape)}, got {mask.dtype} {tuple(mask.shape)}")
