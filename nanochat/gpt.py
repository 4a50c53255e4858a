"""The GPT: a small modern decoder-only transformer sized by one dial, `depth`.

Architecture: token embedding -> RMSNorm -> `n_layer` pre-norm blocks (causal self-attention with
rotary embeddings, QK-norm and optional grouped-query attention, then a relu² MLP) -> RMSNorm -> untied lm_head
-> tanh logit softcap. RMSNorm has no weights and no Linear has a bias.

MegaContext (the megacontext/ package) drives the same model through a few hooks on `forward`:
- `inputs_embeds` feeds vectors of the embedding space (gists) instead of token ids;
- `positions` gives every row its own (possibly fractional) rotary positions, `rotary` a precomputed table;
- `attn_mask` marks the real keys of a left/right padded batch (combined with causality);
- `kv_cache` (`KVCache`) can be truncated to a prefix and continued, or expanded from one row to N.

Shapes: B batch, T new tokens, S keys (cached + new), D model width, H query heads, Hkv key/value heads,
Dh head dim, V vocab.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.muon import Muon

ROPE_BASE = 10000.0
LOGIT_SOFTCAP = 15.0
ROTARY_CACHE_FACTOR = 10  # the default rotary table covers positions 0 .. sequence_len * 10


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int, head_dim: int = 64) -> "GPTConfig":
        """The nanochat dial: width = 64 * depth rounded up to a multiple of head_dim, one head per head_dim."""
        if depth < 1 or head_dim < 2 or head_dim % 2:
            raise ValueError(f"need depth >= 1 and an even head_dim >= 2 (got depth={depth}, head_dim={head_dim})")
        width = math.ceil(64 * depth / head_dim) * head_dim
        n_head = width // head_dim
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head, n_embd=width)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if min(self.sequence_len, self.vocab_size, self.n_layer) < 1:
            raise ValueError(f"sequence_len, vocab_size and n_layer must be positive: {self}")


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable gain: the following Linear can absorb any per-channel scale."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float = ROPE_BASE):
    """Rotary tables for arbitrary (float) positions.

    positions: Float/Long[B, T] -> (cos, sin), each Float32[B, T, 1, head_dim // 2] (the 1 broadcasts over heads).
    Computed in fp32 so fractional positions (MegaContext gists) keep their precision.
    """
    if positions.dim() != 2:
        raise ValueError(f"positions must be [B, T], got shape {tuple(positions.shape)}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, Dh/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + Dh/2) of x: (B, T, H, Dh) by the angles in cos/sin: (B|1, T, 1, Dh/2)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # stay in the autocast dtype (bf16) instead of promoting to fp32
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Keys/values of every layer for incremental decoding.

    Storage is (L, B, Hkv, max_len, Dh) for keys and values; `pos` tokens are valid. `truncate(n)` keeps a prefix
    (MegaContext recomputes only from the first edited working-context entry), `expand(N)` turns a batch-1
    prefill into N identical rows for sampling several continuations.
    """

    def __init__(self, batch_size, num_kv_heads, max_len, head_dim, num_layers, device=None, dtype=torch.float32):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def reset(self) -> None:
        self.pos = 0

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens; the next forward continues at position n."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"can only truncate to 0..{self.pos} cached tokens, got {n}")
        self.pos = n

    def expand(self, batch_size: int) -> None:
        """Replicate a batch-1 cache (e.g. a prompt prefill) into batch_size identical rows."""
        if self.batch_size == batch_size:
            return
        if self.batch_size != 1:
            raise ValueError(f"expand needs a batch-1 cache (this one has {self.batch_size} rows)")
        self.k = self.k.expand(-1, batch_size, -1, -1, -1).contiguous()
        self.v = self.v.expand(-1, batch_size, -1, -1, -1).contiguous()

    def check_room(self, batch_size: int, num_new: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"batch of {batch_size} rows for a KV cache of {self.batch_size}; call expand() first")
        if self.pos + num_new > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} cached + {num_new} new > max_len={self.max_len}; "
                             "make a larger cache or truncate()")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v: (B, Hkv, T, Dh) at [pos, pos+T) of one layer; return that layer's keys/values [0, pos+T)."""
        t0, t1 = self.pos, self.pos + k.size(2)
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def advance(self, num_new: int) -> None:
        self.pos += num_new


def build_attn_bias(attn_mask, num_new: int, offset: int, device):
    """Combine the key-padding mask with causality. Returns (bool mask (B|1, 1, T, S) or None, is_causal).

    Query i sits at key index offset + i and may see keys j <= offset + i. Without padding and without a cache
    offset we let SDPA apply causality itself (is_causal=True keeps the flash kernel on CUDA).
    """
    num_keys = offset + num_new
    if attn_mask is None:
        if offset == 0:
            return None, num_new > 1
        if num_new == 1:
            return None, False  # one new query sees every cached key
    q_idx = torch.arange(num_new, device=device)[:, None] + offset
    k_idx = torch.arange(num_keys, device=device)[None, :]
    allowed = (k_idx <= q_idx)[None, None]  # (1, 1, T, S)
    if attn_mask is None:
        return allowed, False
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 2 or attn_mask.size(1) != num_keys:
        raise ValueError(f"attn_mask must be Bool[B, {num_keys}] (cached + new keys), got "
                         f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
    allowed = allowed & attn_mask[:, None, None, :]  # (B, 1, T, S)
    # A padded query of a left-padded row sees no real key at all. Some SDPA kernels return NaN for such a row, and
    # its gradient then leaks into the real rows even though the loss ignores it (recent CPU math kernels return 0,
    # CUDA kernels differ). Letting every query see itself keeps those rows finite on every backend and changes
    # nothing for real queries (their own key is real, hence already allowed).
    allowed = allowed | (k_idx == q_idx)[None, None]
    return allowed, False


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos_sin, attn_bias, is_causal, kv_cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm bounds the attention logits (stable with high LR); rotation preserves the norm, so order is free.
        q, k = apply_rotary(norm(q), *cos_sin), apply_rotary(norm(k), *cos_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, Dh)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, S, Dh)
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, Dh)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # relu²: sparse and cheap, as in modded-nanogpt


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, attn_bias, is_causal, kv_cache):
        x = x + self.attn(norm(x), cos_sin, attn_bias, is_causal, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Default rotary table (1, sequence_len * 10, 1, Dh/2); non-persistent: derived, so not in checkpoints.
        self.register_buffer("rotary_cos", torch.empty(0), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(0), persistent=False)
        self.init_weights()

    # ---------------------------------------------------------------- init and bookkeeping
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every weight and the rotary table; call after `to_empty(device=...)` from a meta model.

        - wte ~ N(0, 1): its output is RMS-normed at once, so unit scale matches the AdamW lr of 0.2 (relative step).
        - lm_head ~ N(0, 0.001): near-zero logits, so the first loss is ~ln(V) and no token is favoured.
        - input projections (c_q, c_k, c_v, c_fc) ~ U(±sqrt(3/fan_in)), i.e. std 1/sqrt(fan_in): unit-RMS inputs
          give unit-RMS pre-activations.
        - output projections (attn.c_proj, mlp.c_proj) = 0: every block starts as the identity, so the residual
          stream is stable at any depth and the blocks grow in as training finds use for them.
        """
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / lin.in_features)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        device = self.get_device()
        positions = torch.arange(self.config.sequence_len * ROTARY_CACHE_FACTOR, device=device)[None]
        self.rotary_cos, self.rotary_sin = rotary_cos_sin(positions, self.config.head_dim)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if exclude_embedding else n

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward) at full context.

        6 per matmul weight (2 forward, 4 backward; the embedding is a lookup, not a matmul) plus attention:
        QK^T and AV are 2·2·H·Dh·T per token per layer forward, ×3 with backward = 12·L·H·Dh·T.
        """
        cfg = self.config
        return 6.0 * self.num_params(exclude_embedding=True) + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95)) -> list[torch.optim.Optimizer]:
        """[AdamW(embedding, lm_head), Muon(hidden matrices)]; every group records "initial_lr" for schedules.

        AdamW lrs are tuned at width 768 and scaled by (n_embd / 768) ** -0.5, so one set of defaults serves every
        depth. Muon's orthogonalized update already has a width-independent spectral size, so its lr is not scaled.
        weight_decay is decoupled and applies to both optimizers (0 by default, as in nanochat).
        """
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = [self.transformer.wte.weight]
        head_params = [self.lm_head.weight]
        assert len(matrix_params) + 2 == len(list(self.parameters())), "a parameter is missing from the optimizers"
        scale = (self.config.n_embd / 768) ** -0.5
        fused = self.get_device().type == "cuda"
        adamw = torch.optim.AdamW(
            [{"params": head_params, "lr": unembedding_lr * scale},
             {"params": embedding_params, "lr": embedding_lr * scale}],
            betas=adam_betas, eps=1e-10, weight_decay=weight_decay, fused=fused,
        )
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    # ---------------------------------------------------------------- forward
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids Long[B, T] -> Float[B, T, D]: the space `inputs_embeds` (and MegaContext gists) live in."""
        return self.transformer.wte(idx)

    def _rotary_tables(self, B, T, offset, positions, rotary, device):
        """(cos, sin), each (B|1, T, 1, Dh/2), from an override, explicit positions, or the cached default table."""
        if rotary is not None:
            if positions is not None:
                raise ValueError("pass either positions or rotary, not both")
            cos, sin = rotary
            want = (T, 1, self.config.head_dim // 2)
            if cos.shape != sin.shape or cos.dim() != 4 or tuple(cos.shape[1:]) != want or cos.size(0) not in (1, B):
                raise ValueError(f"rotary must be (cos, sin) each [B|1, {T}, 1, {want[2]}], got {tuple(cos.shape)}")
            return cos, sin
        if positions is not None:
            if positions.dim() == 1:
                positions = positions[None]
            if positions.dim() != 2 or positions.size(1) != T or positions.size(0) not in (1, B):
                raise ValueError(f"positions must be [B, T] = [{B}, {T}], got {tuple(positions.shape)}")
            return rotary_cos_sin(positions.to(device), self.config.head_dim)
        if offset + T <= self.rotary_cos.size(1):
            return self.rotary_cos[:, offset:offset + T], self.rotary_sin[:, offset:offset + T]
        # Beyond the cached table (very long generations): exact same formula, computed for just these positions.
        return rotary_cos_sin(torch.arange(offset, offset + T, device=device)[None], self.config.head_dim)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, positions=None, rotary=None, attn_mask=None,
                kv_cache=None, loss_reduction="mean", last_logits_only=False, loss_last_n=None, targeted_only=False):
        """Logits Float32[B, T, V] when targets is None, else the cross-entropy loss (ignore_index=-1):
        "mean" -> scalar, "sum" -> scalar, "none" -> Float[B, T]. See the module docstring for the hooks.
        `last_logits_only`: logits of the last position only, Float32[B, 1, V] (filling a KV cache needs no more;
        the vocabulary projection of every position would dominate the cost of a long recompute).
        `loss_last_n`: the loss of the last n positions only (targets still Long[B, T]; "none" -> Float[B, n]): a
        caller that scores only a sequence's tail skips the vocabulary projection of the rest.
        `targeted_only`: the vocabulary projection runs only where targets >= 0 (same loss; "none" -> 0 elsewhere, as
        ignore_index gives): for batches where many positions have no target (gists, padding), whose projection and
        its backward would be wasted. Off by default: finding the positions costs a host sync on a GPU."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or inputs_embeds")
        x = self.embed(idx) if idx is not None else inputs_embeds  # (B, T, D)
        if x.dim() != 3 or x.size(-1) != self.config.n_embd:
            raise ValueError(f"inputs must be Long[B, T] ids or Float[B, T, {self.config.n_embd}] embeddings, "
                             f"got {tuple(x.shape)}")
        B, T, _ = x.shape
        offset = 0
        if kv_cache is not None:
            kv_cache.check_room(B, T)
            offset = kv_cache.pos
        cos_sin = self._rotary_tables(B, T, offset, positions, rotary, x.device)
        attn_bias, is_causal = build_attn_bias(attn_mask, T, offset, x.device)
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, attn_bias, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        if last_logits_only:
            if targets is not None:
                raise ValueError("last_logits_only is for inference: it cannot compute a loss over every position")
            x = x[:, -1:]
        if loss_last_n is not None:
            if targets is None or targets.shape != (B, T) or not 1 <= loss_last_n <= T:
                raise ValueError(f"loss_last_n needs targets Long[{B}, {T}] and 1 <= n <= {T} (got {loss_last_n})")
            x, targets, T = x[:, -loss_last_n:], targets[:, -loss_last_n:], loss_last_n
        if targets is None:
            if targeted_only:
                raise ValueError("targeted_only needs targets: it projects only the positions that have one")
            return self._logits(x)
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        if targets.shape != (B, T):
            raise ValueError(f"targets must be Long[{B}, {T}], got {tuple(targets.shape)}")
        if not targeted_only:
            loss = F.cross_entropy(self._logits(x).view(B * T, -1), targets.reshape(B * T), ignore_index=-1,
                                   reduction=loss_reduction)
            return loss.view(B, T) if loss_reduction == "none" else loss
        where = (targets >= 0).nonzero(as_tuple=True)  # (B, T) positions with a target
        picked = F.cross_entropy(self._logits(x[where]), targets[where], reduction="none")  # (N,)
        if loss_reduction == "none":
            return torch.zeros(B, T, dtype=picked.dtype, device=picked.device).index_put(where, picked)
        if loss_reduction == "sum":
            return picked.sum()
        return picked.mean() if picked.numel() else picked.sum() * float("nan")  # NaN like an all-ignored mean

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Softcapped fp32 logits Float32[..., V] of final hidden states Float[..., D]."""
        logits = self.lm_head(x).float()  # fp32 for the softcap and a stable cross-entropy under bf16 autocast
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Stream up to max_tokens sampled ids after the prompt `tokens` (list[int]). No KV cache: each step reruns
        the whole sequence, which is simple and fine for tests and small demos; the Engine does it fast."""
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (e.g. [bos])")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
