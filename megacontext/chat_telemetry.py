"""One structured event per MegaContext chat reply: to a JSONL log, the telemetry provider, and W&B.

    log = ReplyLog.from_env(log_path)            # MC_TELEMETRY picks the provider; WANDB_RUN adds a W&B run
    metrics = log.reply(session, prompt_tokens=..., generated_tokens=..., seconds=..., keys_before=...,
                        refocuses=[...])

The event (`inference_update`) carries:
    prompt_tokens      tokens ingested for this turn (the new messages)
    history_tokens     tokens the conversation holds after the reply
    working_budget     W_max, the working context's entry budget
    wc_length          entries in the working context after the reply
    swap_rate          mean share of WC entries each refocus of this reply created (0 without refocus)
    residency          share of the WC's nodes after the reply that were already in it before the reply
    latency_ms         wall time of the whole reply (ingest + decode)
    generated_tokens, tokens_per_s, refocuses, recomputed_positions (KV positions recomputed after refocuses),
    level_counts       WC entries per level
With WANDB_RUN set (and not "dummy"), a W&B run `<WANDB_RUN>-chat` charts these per reply (WANDB_MODE=offline
writes them under $NANOCHAT_BASE_DIR/wandb).
"""

import json
import os
import threading

import numpy as np

from megacontext.telemetry import NoOpTelemetry, TelemetryProvider, telemetry_from_env
from nanochat.common import get_base_dir

CHART_KEYS = ("latency_ms", "tokens_per_s", "swap_rate", "residency", "wc_length", "history_tokens", "refocuses",
              "recomputed_positions", "prompt_tokens", "generated_tokens")


def chat_wandb_run(env=None):
    """A W&B run named `<WANDB_RUN>-chat`, or None when WANDB_RUN is unset or "dummy"."""
    env = os.environ if env is None else env
    run = env.get("WANDB_RUN", "")
    if not run or run == "dummy":
        return None
    import wandb

    wandb_dir = env.get("WANDB_DIR") or os.path.join(get_base_dir(), "wandb")
    os.makedirs(wandb_dir, exist_ok=True)
    return wandb.init(project=env.get("WANDB_PROJECT", "nanochat"), name=f"{run}-chat", dir=wandb_dir,
                      config={"kind": "chat"}, reinit="finish_previous")


class ReplyLog:
    def __init__(self, telemetry: TelemetryProvider | None = None, log_path: str | None = None, wandb_run=None):
        self.telemetry = telemetry or NoOpTelemetry()
        self.log_path = log_path
        self.wandb_run = wandb_run
        self.count = 0
        self._lock = threading.Lock()
        if log_path:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)

    @classmethod
    def from_env(cls, log_path: str | None = None) -> "ReplyLog":
        return cls(telemetry_from_env("megacontext-chat"), log_path, chat_wandb_run())

    def reply(self, session, *, prompt_tokens: int, generated_tokens: int, seconds: float, keys_before: np.ndarray,
              refocuses: list) -> dict:
        keys_after = session.node_keys()
        residency = float(np.isin(keys_after, keys_before).mean()) if keys_after.size else 1.0
        swaps = [r.swap_rate for r in refocuses]
        event = {
            "session": session.session_id,
            "prompt_tokens": int(prompt_tokens),
            "history_tokens": int(session.num_tokens),
            "working_budget": int(session.w_max),
            "wc_length": len(session.wc),
            "swap_rate": round(float(np.mean(swaps)) if swaps else 0.0, 6),
            "residency": round(residency, 6),
            "latency_ms": round(seconds * 1000.0, 3),
            "generated_tokens": int(generated_tokens),
            "tokens_per_s": round(generated_tokens / seconds, 3) if seconds > 0 else 0.0,
            "refocuses": len(refocuses),
            "recomputed_positions": int(sum(r.recomputed or 0 for r in refocuses)),
            "level_counts": session.wc.level_counts(session.cfg.mc_max_lod).tolist(),
        }
        with self._lock:
            self.count += 1
            self.telemetry.emit("inference_update", event)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event) + "\n")
            if self.wandb_run is not None:
                self.wandb_run.log({f"chat/{k}": event[k] for k in CHART_KEYS}, step=self.count)
        return event

    def close(self) -> None:
        self.telemetry.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
