"""Small bidirectional transformer pieces shared by GistNet and LensNet.

Both auxiliary nets look at an unordered-in-time *set* of vectors (the K children of a gist, the W entries of a
working context) and must let every element see every other one, so attention here is never causal. The style
follows nanochat's GPT: pre-norm, RMSNorm without weights, no biases, relu² MLP, and output projections of the
residual branches initialised to zero so a fresh block is the identity map (stable to bolt onto a trained model).

Shapes: B batch (or N gists), S sequence (K children, W entries), Q queries, D width, H heads, Dh = D / H.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learned weight (as in nanochat)."""
    return F.rms_norm(x, (x.size(-1),))


def key_padding_bias(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool[B, S] (True = real key) -> Bool[B, 1, 1, S], the boolean `attn_mask` form SDPA broadcasts over heads
    and queries (True = may attend). None stays None (every key is real)."""
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool or key_mask.dim() != 2:
        raise ValueError(f"key mask must be Bool[B, S], got {key_mask.dtype} {tuple(key_mask.shape)}")
    return key_mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention from queries x: (B, Q, D) to a context c: (B, S, D); self-attention when c is x."""

    def __init__(self, dim: int, n_head: int, zero_init_out: bool = True):
        super().__init__()
        if dim % n_head != 0:
            raise ValueError(f"width {dim} must be divisible by the number of heads {n_head}")
        self.n_head = n_head
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        init_linear(self.q)
        init_linear(self.kv)
        if zero_init_out:
            nn.init.zeros_(self.out.weight)
        else:
            init_linear(self.out)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, Q, D = x.shape
        S = context.size(1)
        H, Dh = self.n_head, D // self.n_head
        q = self.q(x).view(B, Q, H, Dh).transpose(1, 2)  # (B, H, Q, Dh)
        k, v = self.kv(context).view(B, S, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, S, Dh)
        # QK-norm as in the base model: keeps attention logits bounded whatever the input scale.
        q, k = rms_norm(q), rms_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_bias(key_mask), is_causal=False)
        return self.out(y.transpose(1, 2).reshape(B, Q, D))


class MLP(nn.Module):
    """relu² MLP (nanochat's choice), hidden width mlp_ratio * D."""

    def __init__(self, dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.fc = nn.Linear(dim, mlp_ratio * dim, bias=False)
        self.proj = nn.Linear(mlp_ratio * dim, dim, bias=False)
        init_linear(self.fc)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional self-attention + MLP: (B, S, D) -> (B, S, D), padded keys masked out."""

    def __init__(self, dim: int, n_head: int, mlp_ratio: int = 4):
        super().__init__()
        self.attn = Attention(dim, n_head)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = rms_norm(x)
        x = x + self.attn(h, h, key_mask)
        return x + self.mlp(rms_norm(x))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries read a context) + MLP: (B, Q, D), (B, S, D) -> (B, Q, D)."""

    def __init__(self, dim: int, n_head: int, mlp_ratio: int = 4):
        super().__init__()
        self.attn = Attention(dim, n_head)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), rms_norm(context), key_mask)
        return x + self.mlp(rms_norm(x))


def init_linear(layer: nn.Linear) -> None:
    """N(0, 1/fan_in): unit-variance outputs for unit-variance (RMS-normed) inputs."""
    nn.init.normal_(layer.weight, mean=0.0, std=layer.in_features**-0.5)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
