"""What `chat_cli --mc` and `chat_web --mc` share: their flags, and loading a checkpoint with its MC nets.

The nets' architecture (block size, levels, GistNet / LensNet shapes) comes from the checkpoint; only the settings
that are free at inference time can be changed on the command line: where the tree lives, how often to refocus,
the allocator's budget and policy (it is not trained), how many conversations stay open, and where each reply's
event is logged.
"""

import argparse
import os

import torch

from megacontext.chat_store import MCConversationStore
from megacontext.chat_telemetry import ReplyLog
from megacontext.config import ALLOCATOR_POLICY_FLAGS, TREE_BACKENDS, add_allocator_policy_args, with_overrides
from megacontext.nets import load_mc_nets
from nanochat.common import add_flag, get_base_dir

INFERENCE_FIELDS = ("mc_tree", "mc_tree_dir", "mc_refocus_interval", "allocator_soft_max_length",
                    *ALLOCATOR_POLICY_FLAGS)


def add_mc_chat_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("MegaContext")
    g.add_argument("--mc", action="store_true", help="MegaContext: conversations of any length (needs MC nets)")
    add_flag(g, "--mc_tree", choices=TREE_BACKENDS, default=None, help="ram | disk (default: the checkpoint's)")
    add_flag(g, "--mc_tree_dir", default=None,
             help="where disk conversations live ($NANOCHAT_BASE_DIR/mc_conversations)")
    add_flag(g, "--mc_refocus_interval", type=int, default=None, help="tokens between refocus steps")
    add_flag(g, "--allocator_soft_max_length", type=int, default=None, help="WC length each refocus aims for")
    add_allocator_policy_args(g)
    add_flag(g, "--mc_max_conversations", type=int, default=16, help="conversations kept open (LRU beyond)")
    add_flag(g, "--mc_log", default=None,
             help="JSONL file of per-reply events (default: $NANOCHAT_BASE_DIR/chat_logs/mc_replies.jsonl)")


def load_mc_checkpoint(source: str, device: torch.device, model_tag: str | None, step: int | None):
    """(model, tokenizer, meta, nets, checkpoint_dir, step) of a checkpoint saved with MC nets; a clear error when
    it has none."""
    from nanochat.checkpoint_manager import load_model_and_aux

    model, tokenizer, meta, aux, checkpoint_dir, step = load_model_and_aux(source, device, "eval", model_tag, step)
    try:
        nets = load_mc_nets(meta, aux, model)
    except ValueError as e:
        raise ValueError(f"{checkpoint_dir}: {e} (MC checkpoints are saved under tags like d12_mc: pass -g)") from None
    return model, tokenizer, meta, nets.eval(), checkpoint_dir, step


def apply_inference_overrides(nets, args, sequence_len: int) -> None:
    """Command-line settings that are free at inference replace the checkpoint's (validated)."""
    nets.cfg = with_overrides(nets.cfg, args, INFERENCE_FIELDS, sequence_len)


def build_store(model, tokenizer, nets, args) -> MCConversationStore:
    apply_inference_overrides(nets, args, model.config.sequence_len)
    log_path = args.mc_log or os.path.join(get_base_dir(), "chat_logs", "mc_replies.jsonl")
    return MCConversationStore(model, tokenizer, nets, max_conversations=args.mc_max_conversations,
                               log=ReplyLog.from_env(log_path))
