"""MCConfig: every MegaContext setting in one typed dataclass, plus the CLI flags that fill it.

Scripts call `add_mc_args(parser)` once and `MCConfig.from_args(ns)` after parsing; the resolved config is
stored in checkpoint metadata with `to_dict()` and read back with `from_dict()`. Flag names follow the ones
MegaContext users already type (`--block_size`, `--gistnet_*`, `--allocator_*`, `--mc_*`); every flag accepts
both the dash and the underscore spelling.

Values that are derived from others (`W_max` from the model's sequence length, the allocator's soft limit from
`W_max`, the recent tail and the refocus interval from `block_size`) default to None and are resolved by
`resolve(sequence_len)`, so a checkpoint records what was actually used.
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields

import torch

from nanochat.common import add_flag, compute_dtype, get_base_dir, str2bool

# Every choice an MC flag accepts, declared once here; gistnet.py and positions.py validate against these too.
GISTNET_TYPES = ("transformer", "mean")
POOLINGS = ("mean", "query", "cls")
HEADS = ("mlp", "linear")
LENSNET_TYPES = ("transformer",)
ALLOCATOR_TYPES = ("greedy", "stochastic_greedy")
SCORE_REFERENCES = ("relative", "absolute")
TREE_BACKENDS = ("ram", "disk")
POSITIONAL_SCHEMES = ("wc", "global", "gaussian")
AUX_DTYPES = ("auto", "fp32", "bf16")
# 8 / 32 / 128 are the measured settings; any power of two in range works (tests use 2 and 4 for tiny trees).
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 2, 1024
MAX_LOD_LIMIT = 8
# Settings that shape the MC nets' weights: a checkpoint's values win over the command line when continuing it.
ARCHITECTURE_FIELDS = ("block_size", "mc_max_lod", "gistnet_type", "gistnet_layers", "gistnet_pooling",
                       "gistnet_head", "lensnet_type", "lensnet_layers", "lensnet_head")


@dataclass
class MCConfig:
    """All MegaContext knobs. Field names equal the flag names (underscore spelling)."""

    mc: bool = False
    # tree
    block_size: int = 32
    mc_max_lod: int = 2
    mc_tree: str = "ram"
    mc_tree_dir: str | None = None  # None -> $NANOCHAT_BASE_DIR/mc_tree
    # GistNet
    gistnet_type: str = "transformer"
    gistnet_layers: int = 2
    gistnet_pooling: str = "mean"
    gistnet_head: str = "mlp"
    # LensNet
    lensnet_type: str = "transformer"
    lensnet_layers: int = 2
    lensnet_head: str = "mlp"
    # focus allocator
    allocator_type: str = "greedy"
    allocator_soft_max_length: int | None = None  # None -> mc_wc_max - refocus interval
    allocator_recent_tokens: int | None = None  # None -> block_size
    # A score estimates a node's utility in nats of mean loss on the text being continued. Training variants of a
    # row all have the same length, so a constant added to every utility cancels from every label: LensNet learns
    # how nodes rank, not its absolute level (one CPU checkpoint scored every gist of the coarsest cut < 0).
    # "relative" reads each score minus the mean score of the WC's entries outside the recent tail (the tail is raw
    # in every variant, so its scores are fitted to nothing); "absolute" reads the raw scores. The thresholds are
    # margins from that level: at 0 the allocator expands above-average gists into free room and swaps them for
    # below-average groups, and an all-equal (untrained) LensNet makes no edit. On that checkpoint (mc_eval, budget
    # 102 entries, 32 documents) relative margins ±0 / ±0.005 / ±0.01 made 12 / 10 / 0 expansions per document, for
    # 5.299 / 5.300 / 5.328 nats (recency staircase 5.293); absolute thresholds made none at any value >= 0.
    allocator_scores: str = "relative"
    allocator_expand_threshold: float = 0.0
    allocator_collapse_threshold: float = 0.0
    allocator_max_replacements: int = 8
    allocator_iterations: int = 1
    allocator_sample_top_k: int = 8
    allocator_sample_temperature: float = 1.0
    allocator_cooldown: int = 2
    # working context and positions
    mc_wc_max: int | None = None  # W_max; None -> the model's sequence_len
    mc_positional: str = "wc"
    mc_refocus_interval: int | None = None  # None -> block_size
    # training
    mc_aux_dtype: str = "auto"
    mc_num_random_variants: int = 4
    mc_train_wc_length: float = 0.2
    # Share of the run over which the target length anneals to mc_train_wc_length; it is held there for the rest,
    # so LensNet learns at the working point the allocator runs at (its labels drift while the length moves). It also
    # sets most of --mc's cost (variant positions ~ the mean length). The README's 300-step CPU --mc base run at 0.5
    # vs 0.75: val bpb +0.003 vs +0.006 over vanilla, preference correlation -0.32 vs -0.36, tail vs truncation the
    # same (+0.037), bench_train --mc run average 1.49-1.50x vs 1.51-1.52x vanilla.
    mc_wc_anneal_fraction: float = 0.5
    mc_max_counterfactuals: int = 8
    mc_lens_loss_weight: float = 0.1
    # Weight of the variants' next-token loss. GistNet and the level embedding train with AdamW, whose steps do not
    # depend on the gradient's scale, so this sets how hard the shared GPT is pulled toward reading gists (away
    # from its full-window objective), not how fast the MC nets learn. Measured on a 300-step CPU base run (d4,
    # T=512, K=8, 4 variants, same tokens and seed as vanilla): val bpb +0.033 over vanilla at 1.0; -0.001 to +0.008
    # over four runs at 0.25.
    mc_variant_loss_weight: float = 0.25
    # Weight of GistNet's content term (gist_content.py): each gist must name the tokens it covers. 0: off, the LM
    # loss alone trains GistNet, which can collapse to one placeholder vector per level (mc/gist_spread_lod{k}).
    mc_gist_content_weight: float = 0.0
    # GistNet reads the token embeddings detached: the variant loss and the content term then train GistNet alone and
    # never move the GPT's embedding table through the gists (the vanilla loss and the variants' raw tokens still do).
    # With W = 1 at 64 entries (README, 4,000 CPU steps) it changed val bpb by +0.004 and -0.016 on two seeds: no help.
    mc_gist_detach_input: bool = False
    # The variants' loss trains the GPT too (1), or only GistNet and the level embedding (0): gradient still flows
    # through the GPT to the gists, but none lands on its weights, so the GPT follows vanilla's trajectory exactly
    # (same tokens and seed) and GistNet must learn gists that a model never trained on gists can read. At 64 entries
    # (README, 4,000 CPU steps, two seeds) its level-2 gists still collapse to one vector and carry nothing measurable.
    mc_variant_trains_base: bool = True
    # Bradley-Terry scale in nats, against the measured RMS of tail-loss differences between variants of a row
    # (`mc/pair_delta_rms`), which grows as the target length shrinks: 0.002, 0.035, 0.055, 0.12 over the quarters of
    # the README's 300-step CPU --mc base run (d4, T=512, K=8), 0.14 on val at the end. A fresh LensNet fitted for
    # 300 steps at the final length on that run's checkpoint reached a val preference correlation of -0.27, -0.28 and
    # -0.19 at 0.02, 0.05 and 0.15: a scale below the RMS fits mostly the sign of each difference, which a few
    # heavy pairs do not dominate. --mc_lens_adv_norm_beta makes the fit scale-free (then 1.0 is one running RMS).
    mc_lens_temperature: float = 0.05
    mc_lens_adv_norm_beta: float = 0.0
    mc_lens_kl_weight: float = 0.0
    mc_lens_budget_smooth_weight: float = 0.0
    mc_lens_budget_smooth_beta: float = 0.9
    mc_lens_hard_negative_ratio: float = 1.0
    mc_lr: float = 3e-3
    mc_auto_batch: bool = True

    # ------------------------------------------------------------------ derived values
    @property
    def recent_tokens(self) -> int:
        return self.block_size if self.allocator_recent_tokens is None else self.allocator_recent_tokens

    @property
    def refocus_interval(self) -> int:
        return self.block_size if self.mc_refocus_interval is None else self.mc_refocus_interval

    @property
    def tree_dir(self) -> str:
        return self.mc_tree_dir or os.path.join(get_base_dir(), "mc_tree")

    def wc_max(self, sequence_len: int | None = None) -> int:
        """W_max: the explicit flag, else the model's sequence length."""
        if self.mc_wc_max is not None:
            return self.mc_wc_max
        if sequence_len is None:
            raise ValueError("--mc_wc_max is unset and no sequence_len was given to derive it from")
        return sequence_len

    def soft_max_length(self, sequence_len: int | None = None) -> int:
        """The length each refocus brings the WC back to. Between refocus steps up to `refocus_interval` new raw
        tokens join, so the default leaves exactly that much room under W_max."""
        if self.allocator_soft_max_length is not None:
            return self.allocator_soft_max_length
        return self.wc_max(sequence_len) - self.refocus_interval

    def max_history_tokens(self, sequence_len: int | None = None) -> int:
        """A history length up to which the coarsest cut (plus the raw tail) is guaranteed to fit the soft limit.

        Every top-level gist covers K^max_lod tokens; beyond this length no legal WC fits, so raise --mc_max_lod
        or --mc_wc_max for longer conversations.
        """
        k, lod = self.block_size, self.mc_max_lod
        # worst case: the raw tail (recent + an open block) and K-1 leftover gists at each level below the top
        fixed = self.recent_tokens + (k - 1) + (k - 1) * (lod - 1)
        return max(0, self.soft_max_length(sequence_len) - fixed) * k**lod + self.recent_tokens

    def resolve(self, sequence_len: int) -> "MCConfig":
        """A copy with every derived value filled in, validated against the model's sequence length."""
        out = dataclasses.replace(
            self,
            mc_wc_max=self.wc_max(sequence_len),
            allocator_soft_max_length=self.soft_max_length(sequence_len),
            allocator_recent_tokens=self.recent_tokens,
            mc_refocus_interval=self.refocus_interval,
        )
        out.validate()
        if out.mc_wc_max > sequence_len:
            raise ValueError(
                f"--mc_wc_max={out.mc_wc_max} exceeds the model's sequence_len={sequence_len}; the base model "
                f"never saw working contexts that long. Lower --mc_wc_max or train with a longer --max_seq_len."
            )
        return out

    # ------------------------------------------------------------------ validation
    def validate(self) -> "MCConfig":
        """Raise ValueError naming the first bad setting and how to fix it. Returns self for chaining."""
        self._validate_choices()
        self._validate_tree()
        self._validate_allocator()
        self._validate_training()
        return self

    def _validate_choices(self) -> None:
        for name, allowed in (
            ("gistnet_type", GISTNET_TYPES),
            ("gistnet_pooling", POOLINGS),
            ("gistnet_head", HEADS),
            ("lensnet_type", LENSNET_TYPES),
            ("lensnet_head", HEADS),
            ("allocator_type", ALLOCATOR_TYPES),
            ("allocator_scores", SCORE_REFERENCES),
            ("mc_tree", TREE_BACKENDS),
            ("mc_positional", POSITIONAL_SCHEMES),
            ("mc_aux_dtype", AUX_DTYPES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"--{name} must be one of {'|'.join(allowed)} (got {value!r})")
        for name in ("gistnet_layers", "lensnet_layers"):
            _require(getattr(self, name) >= 1, f"--{name} must be >= 1 (got {getattr(self, name)})")

    def _validate_tree(self) -> None:
        k = self.block_size
        if not (MIN_BLOCK_SIZE <= k <= MAX_BLOCK_SIZE) or k & (k - 1):
            raise ValueError(
                f"--block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] (8, 32 or 128 are "
                f"the measured settings); got {k}"
            )
        _require(
            1 <= self.mc_max_lod <= MAX_LOD_LIMIT,
            f"--mc_max_lod must be in [1, {MAX_LOD_LIMIT}] (got {self.mc_max_lod})",
        )
        if self.mc_tree == "disk" and self.mc_tree_dir == "":
            raise ValueError("--mc_tree disk needs a directory: pass --mc_tree_dir PATH or leave it unset")

    def _validate_allocator(self) -> None:
        k, r = self.block_size, self.recent_tokens
        _require(r >= 0 and r % k == 0, f"--allocator_recent_tokens must be a multiple of --block_size={k} (got {r})")
        for name in ("allocator_max_replacements", "allocator_iterations", "allocator_sample_top_k"):
            _require(getattr(self, name) >= 1, f"--{name} must be >= 1 (got {getattr(self, name)})")
        _require(self.allocator_cooldown >= 0, f"--allocator_cooldown must be >= 0 (got {self.allocator_cooldown})")
        _require(
            self.allocator_sample_temperature > 0,
            f"--allocator_sample_temperature must be > 0 (got {self.allocator_sample_temperature})",
        )
        _require(
            self.allocator_collapse_threshold <= self.allocator_expand_threshold,
            f"--allocator_collapse_threshold ({self.allocator_collapse_threshold}) must not exceed "
            f"--allocator_expand_threshold ({self.allocator_expand_threshold}), or one score would both expand "
            f"and collapse",
        )
        _require(self.refocus_interval >= 1, f"--mc_refocus_interval must be >= 1 (got {self.mc_refocus_interval})")
        if self.mc_wc_max is not None:
            # after a refocus: the raw tail (up to recent_tokens + K - 1 tokens, the open block) plus at least one
            # gist; before the next one: up to refocus_interval more raw tokens
            need, grow = r + k, self.refocus_interval
            _require(
                self.mc_wc_max >= need + grow,
                f"--mc_wc_max={self.mc_wc_max} cannot hold the raw recent tail (up to {r} + {k - 1} tokens), one "
                f"gist and the {grow} tokens that arrive between refocus steps; use --mc_wc_max >= {need + grow} or "
                f"lower --allocator_recent_tokens / --mc_refocus_interval",
            )
            soft = self.soft_max_length()
            _require(
                need <= soft <= self.mc_wc_max - grow,
                f"--allocator_soft_max_length={soft} must lie in [{need}, --mc_wc_max - refocus interval = "
                f"{self.mc_wc_max - grow}] so the WC stays within W_max between refocus steps",
            )

    def _validate_training(self) -> None:
        _require(
            0.0 < self.mc_train_wc_length <= 1.0,
            f"--mc_train_wc_length is a fraction of max_seq_len in (0, 1] (got {self.mc_train_wc_length})",
        )
        _require(
            0.0 < self.mc_wc_anneal_fraction <= 1.0,
            f"--mc_wc_anneal_fraction is a share of the run in (0, 1] (got {self.mc_wc_anneal_fraction})",
        )
        _require(
            self.mc_num_random_variants >= 1,
            f"--mc_num_random_variants must be >= 1 (got {self.mc_num_random_variants})",
        )
        _require(
            self.mc_max_counterfactuals >= 1,
            f"--mc_max_counterfactuals must be >= 1 (got {self.mc_max_counterfactuals})",
        )
        for name in ("mc_lens_loss_weight", "mc_lens_kl_weight", "mc_lens_budget_smooth_weight"):
            _require(getattr(self, name) >= 0, f"--{name} must be >= 0 (got {getattr(self, name)})")
        _require(self.mc_gist_content_weight >= 0,
                 f"--mc_gist_content_weight must be >= 0 (0: off), got {self.mc_gist_content_weight}")
        _require(self.mc_variant_loss_weight > 0,
                 f"--mc_variant_loss_weight must be > 0: GistNet learns only from the variant loss "
                 f"(got {self.mc_variant_loss_weight})")
        _require(self.mc_lens_temperature > 0, f"--mc_lens_temperature must be > 0 (got {self.mc_lens_temperature})")
        for name in ("mc_lens_adv_norm_beta", "mc_lens_budget_smooth_beta"):
            _require(0.0 <= getattr(self, name) < 1.0, f"--{name} is an EMA decay in [0, 1) (got {getattr(self, name)})")
        _require(
            0.0 < self.mc_lens_hard_negative_ratio <= 1.0,
            f"--mc_lens_hard_negative_ratio is the kept fraction of pairs in (0, 1] (got "
            f"{self.mc_lens_hard_negative_ratio})",
        )
        _require(self.mc_lr > 0, f"--mc_lr must be > 0 (got {self.mc_lr})")

    # ------------------------------------------------------------------ precision
    def resolve_aux_dtype(self, device_type: str) -> torch.dtype:
        """dtype for GistNet / LensNet: `auto` = bf16 where the hardware does it natively, fp32 elsewhere."""
        if self.mc_aux_dtype == "fp32":
            return torch.float32
        if self.mc_aux_dtype == "bf16":
            return torch.bfloat16
        if self.mc_aux_dtype == "auto":
            return compute_dtype(device_type)
        raise ValueError(f"--mc_aux_dtype must be one of {'|'.join(AUX_DTYPES)} (got {self.mc_aux_dtype!r})")

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MCConfig":
        """Inverse of to_dict. Unknown keys are an error (a checkpoint from a different code version);
        missing keys take today's defaults."""
        if not isinstance(data, dict):
            raise TypeError(f"MCConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown MegaContext config keys {unknown}: the checkpoint was written by a different version of "
                f"megacontext/config.py; known keys are {sorted(known)}"
            )
        return cls(**data).validate()

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "MCConfig":
        missing = [f.name for f in fields(cls) if not hasattr(ns, f.name)]
        if missing:
            raise ValueError(f"argparse namespace lacks MegaContext flags {missing}; call add_mc_args(parser) first")
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)}).validate()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def add_mc_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Register every MegaContext flag (dash and underscore spellings) in one argument group."""
    d = MCConfig()
    # Many MC flags share prefixes (--allocator_soft_max_length, --allocator_sample_top_k, ...): argparse's prefix
    # matching would quietly accept retired spellings such as --allocator_soft_max. Only full names are taken.
    parser.allow_abbrev = False
    g = parser.add_argument_group("MegaContext")
    g.add_argument("--mc", action="store_true", help="enable MegaContext (tree + working context + allocator)")
    add_flag(g, "--block_size", type=int, default=d.block_size, help="tokens per gist block K (8, 32, 128)")
    add_flag(g, "--mc_max_lod", type=int, default=d.mc_max_lod, help="highest gist level of the tree")
    add_flag(g, "--mc_tree", choices=TREE_BACKENDS, default=d.mc_tree, help="tree storage backend")
    add_flag(g, "--mc_tree_dir", default=d.mc_tree_dir, help="directory of the disk tree ($NANOCHAT_BASE_DIR/mc_tree)")
    add_flag(g, "--gistnet_type", choices=GISTNET_TYPES, default=d.gistnet_type)
    add_flag(g, "--gistnet_layers", type=int, default=d.gistnet_layers)
    add_flag(g, "--gistnet_pooling", choices=POOLINGS, default=d.gistnet_pooling)
    add_flag(g, "--gistnet_head", choices=HEADS, default=d.gistnet_head)
    add_flag(g, "--lensnet_type", choices=LENSNET_TYPES, default=d.lensnet_type)
    add_flag(g, "--lensnet_layers", type=int, default=d.lensnet_layers)
    add_flag(g, "--lensnet_head", choices=HEADS, default=d.lensnet_head)
    add_flag(g, "--allocator_type", choices=ALLOCATOR_TYPES, default=d.allocator_type)
    add_flag(g, "--allocator_soft_max_length", type=int, default=None,
             help="WC length the allocator aims for (default: W_max - refocus interval)")
    add_flag(g, "--allocator_recent_tokens", type=int, default=None, help="raw tail kept at level 0 (default: K)")
    add_flag(g, "--allocator_scores", choices=SCORE_REFERENCES, default=d.allocator_scores,
             help="thresholds read scores relative to the mean outside the recent tail, or absolute")
    add_flag(g, "--allocator_expand_threshold", type=float, default=d.allocator_expand_threshold)
    add_flag(g, "--allocator_collapse_threshold", type=float, default=d.allocator_collapse_threshold)
    add_flag(g, "--allocator_max_replacements", type=int, default=d.allocator_max_replacements)
    add_flag(g, "--allocator_iterations", type=int, default=d.allocator_iterations)
    add_flag(g, "--allocator_sample_top_k", type=int, default=d.allocator_sample_top_k)
    add_flag(g, "--allocator_sample_temperature", type=float, default=d.allocator_sample_temperature)
    add_flag(g, "--allocator_cooldown", type=int, default=d.allocator_cooldown, help="steps before an edit may flip")
    add_flag(g, "--mc_wc_max", type=int, default=None, help="W_max, the WC length cap (default: max_seq_len)")
    add_flag(g, "--mc_positional", choices=POSITIONAL_SCHEMES, default="wc", help="rotary positions of WC entries")
    add_flag(g, "--mc_refocus_interval", type=int, default=None, help="tokens between refocus steps (default: K)")
    add_flag(g, "--mc_aux_dtype", choices=AUX_DTYPES, default=d.mc_aux_dtype)
    add_flag(g, "--mc_num_random_variants", type=int, default=d.mc_num_random_variants)
    add_flag(g, "--mc_train_wc_length", type=float, default=d.mc_train_wc_length, help="fraction of max_seq_len")
    add_flag(g, "--mc_wc_anneal_fraction", type=float, default=d.mc_wc_anneal_fraction,
             help="share of the run over which the target WC length anneals; held at --mc_train_wc_length after")
    add_flag(g, "--mc_max_counterfactuals", type=int, default=d.mc_max_counterfactuals)
    add_flag(g, "--mc_lens_loss_weight", type=float, default=d.mc_lens_loss_weight)
    add_flag(g, "--mc_variant_loss_weight", type=float, default=d.mc_variant_loss_weight,
             help="weight of the variants' next-token loss (how hard the GPT learns to read gists)")
    add_flag(g, "--mc_gist_content_weight", type=float, default=d.mc_gist_content_weight,
             help="weight of GistNet's content term: each gist names its tokens (0: off; see mc/gist_spread_lod*)")
    add_flag(g, "--mc_gist_detach_input", type=str2bool, default=d.mc_gist_detach_input,
             help="GistNet reads detached token embeddings: no gradient to the GPT's table through gists (1|0)")
    add_flag(g, "--mc_variant_trains_base", type=str2bool, default=d.mc_variant_trains_base,
             help="the variants' loss also trains the GPT (1), or only the MC nets: the GPT stays vanilla's (0)")
    add_flag(g, "--mc_lens_temperature", type=float, default=d.mc_lens_temperature,
             help="Bradley-Terry scale in nats of tail loss (lower = sharper)")
    add_flag(g, "--mc_lens_adv_norm_beta", type=float, default=d.mc_lens_adv_norm_beta,
             help="EMA decay of the advantage normalisation (0: off)")
    add_flag(g, "--mc_lens_kl_weight", type=float, default=d.mc_lens_kl_weight,
             help="weight of LensNet's KL to the neutral (no-edit) policy")
    add_flag(g, "--mc_lens_budget_smooth_weight", type=float, default=d.mc_lens_budget_smooth_weight,
             help="weight of the budget smoothing penalty (0: off)")
    add_flag(g, "--mc_lens_budget_smooth_beta", type=float, default=d.mc_lens_budget_smooth_beta,
             help="EMA decay of the budget demand")
    add_flag(g, "--mc_lens_hard_negative_ratio", type=float, default=d.mc_lens_hard_negative_ratio,
             help="fraction of variant pairs kept, largest |measured Δloss| first (1: all)")
    add_flag(g, "--mc_lr", type=float, default=d.mc_lr, help="AdamW lr of GistNet, LensNet and the level embedding")
    add_flag(g, "--mc_telemetry_jsonl", default=None,
             help="write MC telemetry events to this JSONL file (MC_OTEL_ENDPOINT, when set, wins: OTLP)")
    add_flag(g, "--mc_auto_batch", type=str2bool, default=d.mc_auto_batch, help="keep the vanilla token budget (1|0)")
    return g


# The focus allocator is not trained: its policy can change at inference (chat, mc_eval) without retraining.
ALLOCATOR_POLICY_FLAGS = {
    "allocator_type": dict(choices=ALLOCATOR_TYPES),
    "allocator_scores": dict(choices=SCORE_REFERENCES),
    "allocator_expand_threshold": dict(type=float),
    "allocator_collapse_threshold": dict(type=float),
    "allocator_max_replacements": dict(type=int),
    "allocator_iterations": dict(type=int),
    "allocator_cooldown": dict(type=int),
    "allocator_sample_top_k": dict(type=int),
    "allocator_sample_temperature": dict(type=float),
}


def add_allocator_policy_args(group) -> None:
    """The allocator flags an inference script accepts on top of a checkpoint; None keeps the checkpoint's value."""
    for name, kind in ALLOCATOR_POLICY_FLAGS.items():
        add_flag(group, "--" + name, default=None, help="default: the checkpoint's", **kind)


def with_overrides(cfg: MCConfig, args, names, sequence_len: int) -> MCConfig:
    """`cfg` with the flags in `names` that were given on the command line, validated for `sequence_len`."""
    changes = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    new = dataclasses.replace(cfg, **changes).validate()
    new.resolve(sequence_len)  # raises naming the flag when the combination cannot work
    return new
