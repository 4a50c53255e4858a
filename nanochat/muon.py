"""Muon: momentum SGD whose update is orthogonalized before it is applied, for the 2-D hidden matrices.

Idea from Keller Jordan's Muon (https://kellerjordan.github.io/posts/muon/, used in modded-nanogpt): take the
Nesterov momentum update G = U S V^T and apply (approximately) U V^T instead, so every direction of the matrix moves
by the same amount. The orthogonalization is a quintic Newton–Schulz iteration, which runs in bf16 on accelerators
and needs no SVD. Its coefficients (3.4445, -4.7750, 2.0315) are tuned to push every singular value into roughly
[0.7, 1.2] in 5 steps rather than to converge exactly; that is accurate enough for an update direction.

Distributed use: the training loop averages gradients first (`nanochat.grad_sync.all_reduce_gradients`), so every rank
computes the same update here and the weights stay identical without further communication.
"""

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T for G: (..., m, n); the same shape comes back, in G's dtype.

    Works in bf16 on CUDA (the iteration is robust to it and it is ~2x faster) and fp32 elsewhere (CPU has no fast
    bf16 matmul).
    """
    if G.dim() < 2:
        raise ValueError(f"orthogonalize needs matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    work_dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(work_dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the short side: X X^T is then the smaller Gram matrix
        X = X.mT
    # Spectral norm <= Frobenius norm, so this puts every singular value in [0, 1], where the iteration converges.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT  # (..., m, m) with m <= n
        B = b * A + c * (A @ A)
        X = a * X + B @ X  # odd quintic polynomial applied to the singular values: a s + b s^3 + c s^5
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters.

    Per step: buf = momentum * buf + g; u = g + momentum * buf (Nesterov) or buf; o = orthogonalize(u);
    p -= lr * max(1, rows / cols) ** 0.5 * o. The aspect-ratio factor makes tall matrices (e.g. the MLP's c_fc is
    4D x D as rows x cols) take a step of the same RMS size per element as square ones. Optional decoupled weight
    decay: p *= 1 - lr * weight_decay. Matrices of the same shape are orthogonalized together in one batched call.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        if lr < 0 or not 0.0 <= momentum < 1.0 or ns_steps < 1 or weight_decay < 0:
            raise ValueError(f"invalid Muon hyperparameters: lr={lr}, momentum={momentum}, ns_steps={ns_steps}, "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon only takes 2-D matrices; give the {tuple(p.shape)} parameter to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((tuple(p.shape), p.device, p.dtype), []).append(p)
            for params in by_shape.values():
                self._update_same_shape(params, group)
        return loss

    def _update_same_shape(self, params: list[torch.Tensor], group: dict) -> None:
        momentum, lr = group["momentum"], group["lr"]
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(p.grad)
            updates.append(p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf)
        ortho = orthogonalize(torch.stack(updates), steps=group["ns_steps"])  # (N, rows, cols)
        rows, cols = params[0].shape
        step_size = lr * max(1.0, rows / cols) ** 0.5
        for p, o in zip(params, ortho.unbind(0)):
            if group["weight_decay"]:
                p.mul_(1.0 - lr * group["weight_decay"])
            p.add_(o, alpha=-step_size)
