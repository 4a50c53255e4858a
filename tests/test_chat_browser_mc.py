"""The focus view of the chat page in Chromium (Playwright, Debian's /usr/bin/chromium): a chat_web --mc server
shows which spans of the conversation are raw and which are gists, and the view changes as refocuses happen.

Fails without /usr/bin/chromium (set MC_SKIP_BROWSER=1 to skip on purpose). Screenshot: test-artifacts/."""

import argparse
import os

import pytest
import torch
from browser_fixtures import ARTIFACTS, chromium_page, require_chromium
from chat_fixtures import LoopbackServer
from mc_chat_fixtures import MC_TAG, SEQ, make_tiny_mc_checkpoint

from megacontext.chat_setup import build_store, load_mc_checkpoint
from nanochat.engine import Engine
from nanochat.web.app import create_app
from nanochat.web.limits import SamplingDefaults
from nanochat.web.pool import WorkerPool

TIMEOUT_MS = 60_000

# Every distinct focus drawn, in order (the bar's data-signature changes once per new focus).
WATCH_FOCUS = """() => {
  window.focusSeen = [];
  const bar = document.getElementById('focus-bar');
  new MutationObserver(() => window.focusSeen.push(bar.dataset.signature))
    .observe(bar, {attributes: true, attributeFilter: ['data-signature']});
}"""


@pytest.fixture
def chromium():
    return require_chromium()


@pytest.fixture
def server(tmp_path, monkeypatch):
    base = str(tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    monkeypatch.setenv("MC_TELEMETRY", "none")
    monkeypatch.delenv("WANDB_RUN", raising=False)
    make_tiny_mc_checkpoint(base)
    model, tokenizer, _, nets, _, _ = load_mc_checkpoint("sft", torch.device("cpu"), MC_TAG, None)
    args = argparse.Namespace(mc=True, mc_tree=None, mc_tree_dir=None, mc_refocus_interval=None,
                              allocator_soft_max_length=None, mc_max_conversations=4, mc_log=None)
    store = build_store(model, tokenizer, nets, args)
    app = create_app(WorkerPool([Engine(model, tokenizer)]), SamplingDefaults(max_tokens=80), mc=store)
    with LoopbackServer(app) as running:
        yield running


def test_focus_view_follows_the_refocuses(chromium, server, tmp_path):
    with chromium_page(chromium, tmp_path / "chromium-profile", TIMEOUT_MS) as page:
        page.goto(server.url + "/")
        page.wait_for_selector("#focus", state="visible")  # the server runs MegaContext: the view is shown
        page.evaluate(WATCH_FOCUS)
        page.fill("#prompt", "Tell me a long story about the quick brown fox.")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-state='done']")
        page.wait_for_function("document.getElementById('focus-summary').textContent.includes('refocuses')")
        first = page.get_attribute("#focus-bar", "data-signature")
        page.fill("#prompt", "And then what happened?")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-state='done']\").length === 2")
        page.wait_for_timeout(500)  # the last poll after the reply
        seen = page.evaluate("window.focusSeen")
        summary = page.inner_text("#focus-summary")
        tokens = int(summary.split("focus: ")[1].split(" tokens")[0])
        assert tokens > 2 * SEQ, summary  # the history outgrew the model's window
        # redrawn as the focus moved (how many redraws the 300 ms poll catches depends on the machine's load)
        assert len(set(seen)) >= 2, seen
        assert page.get_attribute("#focus-bar", "data-signature") != first
        levels = page.eval_on_selector_all("#focus-bar span", "els => els.map(e => Number(e.dataset.level))")
        assert levels[-1] == 0 and max(levels) >= 1  # a raw tail after gists
        page.screenshot(path=os.path.join(ARTIFACTS, "chat_browser_mc.png"), full_page=True)
        page.click("#new-chat")
        assert page.get_attribute("#focus-bar", "data-signature") == ""
