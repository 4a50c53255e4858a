"""The chat page in a real browser: Debian's chromium driven by Playwright against the server on loopback.

Needs `apt-get install chromium` (/usr/bin/chromium; `bash mc_setup --dev` installs it). Without it the test FAILS, because a skip
would hide a broken browser path; set MC_SKIP_BROWSER=1 to skip it on purpose. Playwright's own browser download
is never used. A screenshot is kept at test-artifacts/chat_browser.png.
"""

import json
import os
import re
import time

import httpx
import pytest
from browser_fixtures import ARTIFACTS, chromium_page, require_chromium
from chat_fixtures import LoopbackServer, make_tiny_checkpoint

from nanochat.web.app import create_app
from nanochat.web.generation import Reply, SamplingParams, prompt_ids
from nanochat.web.limits import SamplingDefaults
from nanochat.web.pool import load_pool

REPLY_TOKENS = 40
TIMEOUT_MS = 30_000

# Records the length of every text the assistant bubbles are given. Mutation records keep each replaced text node,
# so every update counts even when several stream events land in one network read (one observer callback).
WATCH_REPLY = """() => {
  window.replyTexts = [];
  window.replyWatcher = new MutationObserver((records) => {
    for (const record of records) {
      if (!record.target.classList || !record.target.classList.contains('assistant')) continue;
      for (const node of record.addedNodes) window.replyTexts.push(node.textContent.length);
    }
  });
  window.replyWatcher.observe(document.getElementById('messages'), {childList: true, subtree: true});
}"""


@pytest.fixture
def chromium():
    return require_chromium()


def paced(generate, seconds_per_token: float = 0.004):
    """The tiny model streams a 2000-token reply in a second or two, which a loaded machine's browser can miss
    entirely; a human-like pace keeps "the reply is still streaming" observable (Stop step) without slowing the
    short replies much."""
    def slow_generate(*args, **kwargs):
        for step in generate(*args, **kwargs):
            time.sleep(seconds_per_token)
            yield step
    return slow_generate


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    make_tiny_checkpoint(str(tmp_path / "base"))
    pool, name = load_pool("sft", "cpu")
    for worker in pool.workers:
        worker.engine.generate = paced(worker.engine.generate)
    with LoopbackServer(create_app(pool, SamplingDefaults(max_tokens=REPLY_TOKENS), model_name=name)) as running:
        running.pool = pool
        yield running


def expected_reply(pool, messages: list[dict], seed: int) -> str:
    """What the model writes for this conversation and seed (the server is idle when this runs)."""
    engine = pool.workers[0].engine
    prompt = prompt_ids(engine.tokenizer, messages)
    defaults = SamplingDefaults()
    return "".join(Reply(engine, prompt, SamplingParams(REPLY_TOKENS, defaults.temperature, defaults.top_k, seed)))


def shown_seed(page) -> int:
    status = page.inner_text("#status")
    match = re.search(r"seed (\d+)", status)
    assert match, status
    return int(match.group(1))


def rewrite_body(**changes):
    """A Playwright route handler that edits the JSON the page posts (settings the page has no controls for)."""
    def handler(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, **changes}))
    return handler


def test_chat_page_streams_replies_in_chromium(chromium, server, tmp_path):
    with chromium_page(chromium, tmp_path / "chromium-profile", TIMEOUT_MS) as page:
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('sft/d1')")
        page.evaluate(WATCH_REPLY)

        # 1. type, send with the button, watch the reply stream in
        page.fill("#prompt", "Hello from the browser!")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-state='done']")
        first = page.inner_text(".msg.assistant")
        assert page.inner_text(".msg.user") == "Hello from the browser!"
        history = [{"role": "user", "content": "Hello from the browser!"}]
        assert first == expected_reply(server.pool, history, shown_seed(page))
        growth = page.evaluate("window.replyTexts")
        assert len(growth) >= 10 and growth == sorted(growth), growth  # shown piece by piece as events came
        assert growth[-1] == len(first)
        page.evaluate("window.replyWatcher.disconnect()")
        assert f"{REPLY_TOKENS} tokens in" in page.inner_text("#status")

        # 2. a follow-up with Enter: the page sends the whole conversation
        page.fill("#prompt", "Tell me more.")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-state='done']\").length === 2")
        second = page.locator(".msg.assistant").nth(1).inner_text()
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more."}]
        assert second == expected_reply(server.pool, history, shown_seed(page))
        page.screenshot(path=os.path.join(ARTIFACTS, "chat_browser.png"), full_page=True)

        # 3. New Conversation clears the page (and the history it sends)
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0 and page.is_visible("#empty")

        # 4. a server-side 400 shows its message and gives the text back for editing
        page.route("**/chat/completions", rewrite_body(temperature=9))
        page.fill("#prompt", "too hot")
        page.click("#send")
        page.wait_for_selector(".msg.error")
        assert "temperature=9 is out of range" in page.inner_text(".msg.error")
        assert page.input_value("#prompt") == "too hot"
        page.unroute("**/chat/completions")

        # 5. Stop ends a long reply early; the server frees its worker
        page.click("#new-chat")
        page.route("**/chat/completions", rewrite_body(max_tokens=4096))
        page.fill("#prompt", "Write a very long answer.")
        page.click("#send")
        page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 20")
        assert page.inner_text("#send") == "Stop"  # part of the reply is on screen while it is still generating
        page.click("#send", force=True)  # at once: waiting for the busy page to look "stable" can outlast the reply
        page.wait_for_selector(".msg.assistant[data-state='done']")
        assert page.inner_text("#status") == "stopped" and page.inner_text("#send") == "Send"

    deadline = time.monotonic() + 15
    while (stats := httpx.get(server.url + "/stats", timeout=10).json())["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["busy"] == 0 and stats["requests_cancelled"] == 1 and stats["requests_served"] == 2
