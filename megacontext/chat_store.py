"""MegaContext conversations for the chat front ends: one `MCSession` per conversation id, bounded, persistent.

    store = MCConversationStore(model, tokenizer, nets, max_conversations=16)
    reply, conv_id, prompt_tokens = store.start_reply(messages, params, conversation_id="abc")
    for piece in reply: ...          # text, as from nanochat.web.generation.Reply
    store.focus("abc")               # the focus map: which spans of the history are raw, which are gists

Clients send the whole message list every time (the web page, OpenAI clients). A known conversation checks that
the messages it already holds are unchanged (a digest per message) and ingests only the new ones; an unknown id
starts a history from the whole list, however long. So the model's window never limits a conversation; the
tree's capacity (`MCConfig.max_history_tokens`) does, with an error naming the flags to raise.

At most `max_conversations` sessions stay open; the least recently used one is closed when another opens.
With `--mc_tree disk` each conversation lives in `<mc_tree_dir>/<id>/` (default
$NANOCHAT_BASE_DIR/mc_conversations/<id>/): the tree (flushed after every reply) and `state.json` (message
digests and the focus). A conversation closed, evicted or lost with a killed server
reopens from there with its whole history. A reply that never finished leaves no trace: the tree rolls back to
its last flush, and the client sends that turn again.
"""

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict

import numpy as np

from megacontext.chat_telemetry import ReplyLog
from megacontext.session import MCSession
from megacontext.tree import open_tree_store
from nanochat.common import atomic_write_bytes, get_base_dir
from nanochat.engine import Engine
from nanochat.web.generation import Reply, SamplingParams

CONVERSATION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STATE_FILE = "state.json"


class ConversationError(ValueError):
    """A request that does not fit the conversation's state. `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def message_digest(message: dict) -> str:
    raw = json.dumps([message["role"], message["content"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:24]


class MCConversation:
    def __init__(self, conversation_id: str, session: MCSession, state_dir: str | None):
        self.id, self.session, self.state_dir = conversation_id, session, state_dir
        self.digests: list[str] = []  # one per message whose tokens are in the history
        self.replies = 0
        self.busy = False
        self.last_used = time.time()

    def turn_ids(self, tokenizer, messages: list[dict]) -> tuple[list[int], list[str]]:
        """Token ids of the messages this conversation has not seen, and their digests."""
        n = len(self.digests)
        digests = [message_digest(m) for m in messages]
        if n and len(messages) > n and messages[n - 1]["role"] == "assistant" and digests[:n - 1] == self.digests[:-1]:
            # our last reply may come back shorter: a client that stopped it keeps only the text it had received
            # (the history holds every token the model wrote)
            self.digests[-1] = digests[n - 1]
        if digests[:n] != self.digests or len(messages) <= n:
            raise ConversationError(409, f"the messages do not continue conversation {self.id!r} (it holds {n} "
                                         "messages and they differ or were not all sent): send the whole "
                                         "conversation again, or use a new conversation id")
        new = messages[n:]
        if new[-1]["role"] != "user":
            raise ConversationError(400, "the last message must be a user message")
        ids = tokenizer.render_for_completion({"messages": new})
        if n:  # continue after our last reply: close it, drop the new render's <|bos|>
            if new[0]["role"] != "user":
                raise ConversationError(400, f"message {n} must be a user message (it follows the reply)")
            ids = [tokenizer.encode_special("<|assistant_end|>"), *ids[1:]]
        return ids, digests[n:]

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        """Flush the tree, then record the digests and the focus that match it."""
        if self.state_dir is None:
            return
        self.session.tree.store.flush()
        wc = self.session.wc
        state = {"conversation_id": self.id, "num_tokens": self.session.num_tokens, "digests": self.digests,
                 "replies": self.replies, "levels": wc.levels.tolist(), "indices": wc.indices.tolist()}
        atomic_write_bytes(os.path.join(self.state_dir, STATE_FILE), json.dumps(state).encode())

    def load(self) -> None:
        path = os.path.join(self.state_dir, STATE_FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        self.digests, self.replies = list(state["digests"]), int(state["replies"])
        if state["num_tokens"] == self.session.num_tokens:
            self.session.restore_wc(np.asarray(state["levels"]), np.asarray(state["indices"]))
        # else the server died between flushing the tree and writing this file: the session keeps the default
        # focus over the tree's whole history

    def close(self) -> None:
        if self.state_dir is not None:
            self.save()
        self.session.close()


class MCReply(Reply):
    """A `Reply` over a conversation: when it ends (however), the turn is recorded, saved and logged."""

    def __init__(self, store: "MCConversationStore", conversation: MCConversation, turn: list[int],
                 new_digests: list[str], params: SamplingParams, cancel: threading.Event | None):
        super().__init__(Engine(store.model, store.tokenizer, mc=conversation.session), turn, params, cancel)
        self.store, self.conversation, self.new_digests = store, conversation, new_digests
        self.metrics: dict | None = None

    def __iter__(self):
        conv, session = self.conversation, self.conversation.session
        started, keys_before, refocus_before = time.perf_counter(), session.node_keys(), len(session.refocuses)
        history_before, pieces = session.num_tokens, []
        inner = super().__iter__()
        try:
            for piece in inner:
                pieces.append(piece)
                yield piece
        finally:
            inner.close()  # now, so the reply's last token joins the history before it is saved
            text = "".join(pieces)
            if session.num_tokens > history_before:  # the turn reached the history: record it
                conv.digests.extend([*self.new_digests, message_digest({"role": "assistant", "content": text})])
                conv.replies += 1
                conv.save()
            conv.busy = False
            conv.last_used = time.time()
            self.metrics = self.store.log.reply(session, prompt_tokens=len(self.prompt),
                                                generated_tokens=self.num_tokens,
                                                seconds=time.perf_counter() - started, keys_before=keys_before,
                                                refocuses=session.refocuses[refocus_before:])


    def abandon(self) -> None:
        """The reply will never run (e.g. no worker was free): release the conversation."""
        self.conversation.busy = False


class MCConversationStore:
    def __init__(self, model, tokenizer, nets, max_conversations: int = 16, log: ReplyLog | None = None):
        if max_conversations < 1:
            raise ValueError(f"--mc_max_conversations must be >= 1, got {max_conversations}")
        self.model, self.tokenizer, self.nets = model, tokenizer, nets
        self.cfg = nets.cfg
        self.max_conversations = max_conversations
        self.log = log or ReplyLog()
        self.open: OrderedDict[str, MCConversation] = OrderedDict()  # least recently used first
        self.lock = threading.Lock()
        self.evicted = 0

    def _state_dir(self, conversation_id: str) -> str | None:
        if self.cfg.mc_tree != "disk":
            return None
        root = self.cfg.mc_tree_dir or os.path.join(get_base_dir(), "mc_conversations")  # apart from training trees
        return os.path.join(root, conversation_id)

    def _open(self, conversation_id: str) -> MCConversation:
        state_dir = self._state_dir(conversation_id)
        dtype = self.model.transformer.wte.weight.dtype
        store = open_tree_store(self.cfg.mc_tree, self.cfg.block_size, self.model.config.n_embd, self.cfg.mc_max_lod,
                                path=None if state_dir is None else os.path.join(state_dir, "tree"),
                                device=self.model.get_device(), dtype=dtype)
        conv = MCConversation(conversation_id, MCSession(self.model, self.nets, store, conversation_id), state_dir)
        if state_dir is not None:
            conv.load()
        return conv

    def get(self, conversation_id: str, create: bool = True) -> MCConversation | None:
        if not CONVERSATION_ID_RE.match(conversation_id or ""):
            raise ConversationError(400, f"conversation id {conversation_id!r} must be 1-64 characters of "
                                         "A-Z a-z 0-9 _ -")
        with self.lock:
            conv = self.open.get(conversation_id)
            if conv is not None:
                self.open.move_to_end(conversation_id)
                return conv
            on_disk = self._state_dir(conversation_id)
            if not create and not (on_disk and os.path.exists(os.path.join(on_disk, STATE_FILE))):
                return None
            self._evict(room_for=1)
            conv = self._open(conversation_id)
            self.open[conversation_id] = conv
            return conv

    def _evict(self, room_for: int) -> None:
        while len(self.open) + room_for > self.max_conversations:
            victim = next((cid for cid, c in self.open.items() if not c.busy), None)
            if victim is None:
                raise ConversationError(503, f"all {len(self.open)} open conversations are replying; retry later")
            self.open.pop(victim).close()
            self.evicted += 1

    def start_reply(self, messages: list[dict], params: SamplingParams, conversation_id: str | None = None,
                    cancel: threading.Event | None = None) -> tuple[MCReply, str, int]:
        """(reply to iterate, conversation id, tokens ingested for this turn). New ids are made up when None."""
        conversation_id = conversation_id or uuid.uuid4().hex
        conv = self.get(conversation_id)
        with self.lock:
            if conv.busy:
                raise ConversationError(409, f"conversation {conversation_id!r} is still replying; wait for it")
            turn, new_digests = conv.turn_ids(self.tokenizer, messages)
            conv.session.check_room(len(turn) + params.max_tokens)
            conv.busy = True
        return MCReply(self, conv, turn, new_digests, params, cancel), conversation_id, len(turn)

    def reset(self, conversation_id: str) -> None:
        """Forget a conversation (its files too)."""
        with self.lock:
            conv = self.open.pop(conversation_id, None)
        if conv is not None:
            conv.session.close()
        state_dir = self._state_dir(conversation_id)
        if state_dir is not None and os.path.isdir(state_dir):
            shutil.rmtree(state_dir)

    def focus(self, conversation_id: str) -> dict | None:
        conv = self.get(conversation_id, create=False)
        if conv is None:
            return None
        return {**conv.session.focus_map(), "replies": conv.replies, "busy": conv.busy}

    def stats(self) -> dict:
        with self.lock:
            convs = list(self.open.values())
        return {"tree": self.cfg.mc_tree, "max_conversations": self.max_conversations, "open": len(convs),
                "evicted": self.evicted, "w_max": convs[0].session.w_max if convs else None,
                "conversations": [{"id": c.id, "tokens": c.session.num_tokens, "wc_length": len(c.session.wc),
                                   "replies": c.replies, "busy": c.busy, "last_used": round(c.last_used, 3)}
                                  for c in reversed(convs)]}

    def close(self) -> None:
        with self.lock:
            convs, self.open = list(self.open.values()), OrderedDict()
        for conv in convs:
            conv.close()
        self.log.close()
