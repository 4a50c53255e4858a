"""Fast inference: prefill once, decode with the KV cache, sample N continuations, run the calculator tool.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50):
        ...  # column[i] is row i's next token; masks[i] = 1 if sampled, 0 if forced (tool output / padding)
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

The prompt is run through the model once with a batch-1 KV cache; the cache is then expanded to `num_samples`
rows so every sample shares that prefill and only decode steps cost N rows. Each step samples one token per row
(greedy at temperature 0, optionally restricted to the top-k logits), with a seeded `torch.Generator` so a seed
reproduces the same samples.

Tool use: when a row writes <|python_start|> expr <|python_end|>, the text in between is evaluated by
`nanochat.calculator` (arithmetic and two string helpers, never `eval`), and `<|output_start|> result
<|output_end|>` is forced into that row token by token (mask 0): the model reads the result as if it had written
it, which is exactly how training rendered tool outputs. An expression the calculator refuses yields the output
"error", so the model sees that its call failed.

MegaContext: `Engine(model, tokenizer, mc=session)` decodes over a conversation of any length. The session (built
by the scripts; this package never imports megacontext) owns the history and the KV cache; `tokens` are then the
*new* tokens of this turn, appended to that history, and the reply's tokens join it as they are fed. The session
must provide `prefill(ids) -> logits (1, V)`, `step(column) -> logits (rows, V)`, `append(ids)` (history only, no
forward), `fork(rows, max_tokens) -> logits (rows, V)` and `unfork()` for several samples over the shared history.
Greedy decoding gives the same tokens as without the session while the history fits the window.

A row finishes at <|assistant_end|> or <|bos|>, or at a turn marker (<|user_start|>, <|user_end|>,
<|assistant_start|>): a model that starts writing the next turn has ended its own. Finished rows keep a slot in every later column (the terminal
token again, mask 0) so columns stay rectangular; generation stops when every row is finished or after
`max_tokens` steps.
"""

from collections import deque
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nanochat.calculator import CalculatorError, evaluate
from nanochat.gpt import KVCache

TOOL_ERROR_OUTPUT = "error"


def sample_next(logits: torch.Tensor, generator: torch.Generator, temperature: float,
                top_k: int | None) -> torch.Tensor:
    """logits Float[B, V] -> Long[B] next tokens. temperature 0 = argmax; top_k keeps the k largest logits
    (None or 0: no restriction)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if top_k and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)  # (B, k)
        probs = F.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        return indices.gather(-1, choice).squeeze(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def run_calculator(expression: str) -> str:
    """The tool's reply to one call: the result as text, or TOOL_ERROR_OUTPUT when the calculator refuses."""
    try:
        return evaluate(expression)
    except CalculatorError:
        return TOOL_ERROR_OUTPUT


class RowState:
    """Per-sample decoding state: tokens waiting to be forced in, and the python block being written."""

    def __init__(self):
        self.forced: deque[int] = deque()
        self.python_tokens: list[int] | None = None  # not None while inside <|python_start|> ... <|python_end|>
        self.finished = False


class Engine:
    def __init__(self, model, tokenizer, mc=None):
        self.model = model
        self.tokenizer = tokenizer
        self.mc = mc  # a MegaContext session, or None (see the module docstring)
        special = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = special("<|assistant_end|>")
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        # Tokens that end the assistant's reply; none of them is part of the reply's text.
        self.stop_tokens = frozenset({self.assistant_end, self.bos, special("<|user_start|>"),
                                      special("<|user_end|>"), special("<|assistant_start|>")})

    def _new_cache(self, max_len: int) -> KVCache:
        cfg = self.model.config
        device = self.model.get_device()
        dtype = self.model.transformer.wte.weight.dtype
        if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")  # keys/values come out of autocast matmuls in this dtype
        return KVCache(batch_size=1, num_kv_heads=cfg.n_kv_head, max_len=max_len, head_dim=cfg.n_embd // cfg.n_head,
                       num_layers=cfg.n_layer, device=device, dtype=dtype)

    def _check_args(self, tokens, num_samples, max_tokens, temperature, top_k) -> int:
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise TypeError("tokens must be a non-empty list of int token ids (e.g. tokenizer.render_for_completion)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no top-k restriction), got {top_k}")
        if max_tokens is None and self.mc is not None:
            raise ValueError("with a MegaContext session the history has no fixed end: pass max_tokens")
        if max_tokens is None:
            max_tokens = self.model.config.sequence_len - len(tokens)
            if max_tokens < 1:
                raise ValueError(f"the prompt ({len(tokens)} tokens) fills the model's context "
                                 f"({self.model.config.sequence_len}); pass max_tokens explicitly or shorten it")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        return max_tokens

    def _advance_row(self, row: RowState, sampled: int) -> tuple[int, int]:
        """Pick row's token for this step (a forced one if queued) and update its tool state -> (token, mask)."""
        if row.finished:
            return self.assistant_end, 0
        token, mask = (row.forced.popleft(), 0) if row.forced else (sampled, 1)
        if token in self.stop_tokens:
            row.finished = True
        elif token == self.python_start:
            row.python_tokens = []
        elif token == self.python_end and row.python_tokens is not None:
            result = run_calculator(self.tokenizer.decode(row.python_tokens))
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.python_tokens = None
        elif row.python_tokens is not None:
            row.python_tokens.append(token)
        return token, mask

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks), one entry per sample, for each decoding step (see module doc)."""
        max_tokens = self._check_args(tokens, num_samples, max_tokens, temperature, top_k)
        device = self.model.get_device()
        generator = torch.Generator(device=device).manual_seed(seed)
        if self.mc is not None:
            yield from self._generate_mc(tokens, num_samples, max_tokens, temperature, top_k, generator)
            return
        cache = self._new_cache(len(tokens) + max_tokens)
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = self.model(prompt, kv_cache=cache)[:, -1, :]  # (1, V): prefill once for all samples
        cache.expand(num_samples)
        logits = logits.expand(num_samples, -1)  # (N, V)
        rows = [RowState() for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next(logits, generator, temperature, top_k).tolist()  # N ints
            column, masks = zip(*(self._advance_row(row, s) for row, s in zip(rows, sampled)))
            yield list(column), list(masks)
            if all(row.finished for row in rows) or step == max_tokens - 1:
                return
            ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]  # (N, 1)
            logits = self.model(ids, kv_cache=cache)[:, -1, :]  # (N, V)

    def _generate_mc(self, tokens, num_samples, max_tokens, temperature, top_k, generator):
        """`generate` over a MegaContext session: the same sampling and tool handling, the session's forwards."""
        session = self.mc
        logits = session.prefill(tokens)  # (1, V)
        if num_samples > 1:
            logits = session.fork(num_samples, max_tokens)  # (N, V): the samples share the history
        rows = [RowState() for _ in range(num_samples)]
        unfed = None  # the last yielded column until it is fed: a reply cut short still joins the history
        try:
            for step in range(max_tokens):
                sampled = sample_next(logits, generator, temperature, top_k).tolist()
                column, masks = zip(*(self._advance_row(row, s) for row, s in zip(rows, sampled)))
                unfed = list(column)
                yield list(column), list(masks)
                if all(row.finished for row in rows) or step == max_tokens - 1:
                    return
                logits = session.step(unfed)
                unfed = None
        finally:
            if num_samples > 1:
                session.unfork()
            elif unfed is not None and unfed[0] not in self.stop_tokens:
                session.append(unfed)

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Run `generate` to the end. Returns (results, masks): each result is the prompt followed by that
        sample's tokens, without the terminal stop token; masks align with results (prompt = 0)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                    continue
                results[i].append(token)
                masks[i].append(mask)
        return results, masks
