"""A content term for GistNet: each gist must name the tokens it covers (`--mc_gist_content_weight`).

Trained by the LM loss alone, GistNet can settle on one placeholder vector per level: the GPT gains little from
what a gist says about the history early in training, a constant is the easiest thing to read, and once every
gist is the same there is nothing for the GPT to learn to use (see `mc/gist_spread_lod{k}`). This term rules the
placeholder out. A gist at level l covers K**l tokens; scored against the GPT's own token-embedding table (as
cosines, scaled by sqrt(D) so a perfect match is a confident logit), it must give those tokens high probability:

    loss = mean over built gists g and their covered tokens t of  -log softmax_v(sqrt(D) cos(g, wte[v]))[t]

The table is detached in the score, so the term pulls gists toward the embeddings the GPT already reads rather than
the table toward the gists (its gradient still reaches the embeddings through the children GistNet reads, as the LM
loss's does, unless `--mc_gist_detach_input` detaches them). A constant gist scores the same on every block, so it
pays the whole bag-of-words entropy of the text.
"""

import torch
import torch.nn.functional as F


def gist_content_loss(levels: list[torch.Tensor], ids: torch.Tensor, token_table: torch.Tensor,
                      block_size: int) -> torch.Tensor:
    """levels: [Float[B, n_l, D]] gists of levels 1..L (NaN rows: not built); ids: Long[B, T] the tokens under
    them; token_table: Float[V, D]. Returns the mean over levels (with at least one built gist) of the per-level
    mean token cross-entropy, in nats; 0 (with no graph) when no gist was built."""
    table = F.normalize(token_table.detach().float(), dim=-1)  # (V, D)
    scale = token_table.shape[1] ** 0.5
    per_level = []
    for level, gists in enumerate(levels, start=1):
        span = block_size ** level
        B, n, D = gists.shape
        built = torch.isfinite(gists).all(dim=-1)  # (B, n)
        if not built.any():
            continue
        covered = ids[:, : n * span].reshape(B, n, span)[built]  # (N, span)
        logits = scale * F.normalize(gists[built].float(), dim=-1) @ table.T  # (N, V)
        logp = torch.log_softmax(logits, dim=-1)
        per_level.append(-logp.gather(1, covered).mean())
    if not per_level:
        return token_table.new_zeros((), dtype=torch.float32)
    return torch.stack(per_level).mean()
