"""The chat page of ``llama2 serve`` (GET /): served without the API key, and driven in a real
headless Chromium against a real uvicorn server with a tiny random model — streamed answers,
multi-turn history, New chat, server errors and the guard's verdicts shown in the page.

The browser is Debian's /usr/bin/chromium driven by Playwright's Python package (its bundled
driver; ``playwright install`` is never run). Without that browser these tests skip, except under
LLAMA2_STRICT_SKIPS=1 (CI, which installs it: .ci/run), where they fail."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from llama2.serve.app import APIError, create_app  # noqa: E402

from .test_serve import FakeGuard, running_server  # noqa: E402

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # only the browser tests need it (they say so below)
    expect = sync_playwright = None

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "page-key"
SYSTEM = "You are a terse assistant."
# The model directory's own sampling defaults, which the page must start from (Meta's are 0.6 / 0.9).
GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.95}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_dir(chat_dir):
    """The tiny random chat model (256-token context) with its own generation_config.json defaults."""
    cfg = json.loads((chat_dir / "generation_config.json").read_text())
    (chat_dir / "generation_config.json").write_text(json.dumps({**cfg, **GENERATION_DEFAULTS}))
    return chat_dir


# -- the route --------------------------------------------------------------------------------
def test_the_page_is_served_without_the_key_and_carries_the_servers_defaults(model_dir):
    with TestClient(create_app(model_dir, api_key=KEY)) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        assert '<textarea id="system"' in page and CHAT in page and "/v1/models" in page
        defaults = re.search(r'<script type="application/json" id="defaults">(.*?)</script>', page).group(1)
        assert json.loads(defaults) == GENERATION_DEFAULTS
        # Self-contained: no script, style sheet or image from anywhere else.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page
        assert client.get("/v1/models").status_code == 401  # the API itself still needs the key
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_guard_verdict_rides_on_chat_responses(model_dir):
    guard = FakeGuard()
    with TestClient(create_app(model_dir, guard=guard)) as client:
        hello = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
        r = client.post(CHAT, json={"messages": [{"role": "user", "content": "how to build a bomb"}], "max_tokens": 4})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "content_filter" and "O3" in error["message"]
        assert error["guard"] == {"unsafe": True, "categories": ["O3: Criminal Planning"]}

        choice = client.post(CHAT, json=hello).json()["choices"][0]
        assert choice["guard"] == {"unsafe": False, "categories": []} and choice["finish_reason"] == "length"

        guard.flag_answers = True
        choice = client.post(CHAT, json=hello).json()["choices"][0]
        assert choice["guard"] == {"unsafe": True, "categories": ["O1: Violence and Hate"]}
        assert (choice["finish_reason"], choice["message"]["content"]) == ("content_filter", "")
        events = sse_events(client.post(CHAT, json={**hello, "stream": True}).text)
        last = [e for e in events if e["choices"]][-1]["choices"][0]
        assert last["finish_reason"] == "content_filter"
        assert last["guard"] == {"unsafe": True, "categories": ["O1: Violence and Hate"]}

    with TestClient(create_app(model_dir)) as client:  # no guard, no verdict
        assert "guard" not in client.post(CHAT, json=hello).json()["choices"][0]
        assert not any("guard" in c for e in sse_events(client.post(CHAT, json={**hello, "stream": True}).text)
                       for c in e["choices"])


def sse_events(text: str) -> list[dict]:
    lines = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# -- in a real browser ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    missing = ("Debian's chromium is not installed (apt-get install chromium)" if not CHROMIUM.exists()
               else "playwright is not installed (pip install -e '.[test]')" if sync_playwright is None else None)
    if missing:
        if os.environ.get("LLAMA2_STRICT_SKIPS") == "1":
            pytest.fail(f"{missing}; CI installs both (.ci/run)")
        pytest.skip(missing)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class ChatPage:
    """The page in a browser tab, and the chat requests it sent (their JSON bodies, in order)."""

    def __init__(self, browser, url: str):
        self.url = url
        self.page = browser.new_page(viewport={"width": 1100, "height": 800})
        self.sent: list[dict] = []
        self.page.on("request", lambda r: self.sent.append(json.loads(r.post_data))
                     if r.method == "POST" and r.url.endswith(CHAT) else None)
        self.page.goto(url + "/")

    def say(self, text: str):
        """Send ``text`` and wait for the answer to finish; the answer's message element."""
        answers = self.page.locator("#messages .msg.assistant")
        n = answers.count()
        self.page.fill("#message", text)
        self.page.click("#send")
        answer = answers.nth(n)
        expect(answer).to_have_attribute("data-state", re.compile("^(done|error)$"), timeout=60_000)
        return answer

    def screenshot(self, tmp_path: Path, name: str) -> None:
        path = tmp_path / name
        self.page.screenshot(path=str(path), full_page=True)
        if os.environ.get("LLAMA2_TEST_ARTIFACTS"):
            out = Path(os.environ["LLAMA2_TEST_ARTIFACTS"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, out / name)


def plain_answer(url: str, request: dict) -> str:
    """What the server answers the page's request without streaming."""
    r = httpx.post(url + CHAT, json={**request, "stream": False}, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_a_streamed_multi_turn_chat_in_chromium(model_dir, browser, tmp_path):
    with running_server(create_app(model_dir, api_key=KEY)) as url:
        chat = ChatPage(browser, url)
        page = chat.page
        expect(page.locator("#status")).to_contain_text("missing API key")  # /v1/models needs it
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#model")).to_have_value(model_dir.name)
        assert page.input_value("#temperature") == "0.7" and page.input_value("#top-p") == "0.95"
        assert page.input_value("#max-tokens") == "256"

        # The 256-token context cannot hold the default max_tokens: the server's error is shown.
        page.fill("#system", SYSTEM)
        page.fill("#temperature", "0")
        failed = chat.say("Hello there")
        assert failed.get_attribute("data-state") == "error"
        expect(failed.locator(".error")).to_contain_text("maximum context length is 256 tokens")

        page.fill("#max-tokens", "12")
        first = chat.say("Hello there")
        system, user = {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}
        # The failed exchange is left out of the history.
        assert chat.sent[1] == {"messages": [system, user], "stream": True, "temperature": 0, "top_p": 0.95,
                                "max_tokens": 12, "model": model_dir.name}
        expected = plain_answer(url, chat.sent[1])  # (the server has --api-key: the page sent it)
        assert expected and first.locator(".text").text_content() == expected
        assert first.get_attribute("data-state") == "done"

        second = chat.say("And then?")
        assert chat.sent[2]["messages"] == [system, user, {"role": "assistant", "content": expected},
                                            {"role": "user", "content": "And then?"}]
        assert second.locator(".text").text_content() == plain_answer(url, chat.sent[2])
        chat.screenshot(tmp_path, "chat_page.png")

        page.click("#new-chat")
        expect(page.locator("#messages .msg")).to_have_count(0)
        chat.say("Hi")
        assert chat.sent[3]["messages"] == [system, {"role": "user", "content": "Hi"}]


def test_an_error_event_in_the_stream_is_shown(model_dir, browser):
    """A failure after the stream began arrives as the stream's last event (the server's _sse)."""
    error = APIError(500, "generation failed: the engine stopped", code="generation_failed").body()
    stream = f'data: {json.dumps({"choices": [{"index": 0, "delta": {"content": "Par"}}]})}\n\n' \
             f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    with running_server(create_app(model_dir)) as url:
        chat = ChatPage(browser, url)
        chat.page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                                 body=stream))
        answer = chat.say("Hello")
        assert answer.get_attribute("data-state") == "error"
        assert answer.locator(".text").text_content() == "Par"
        expect(answer.locator(".error")).to_have_text("generation failed: the engine stopped")


def test_the_guards_verdicts_in_chromium(model_dir, browser, tmp_path):
    guard = FakeGuard()
    with running_server(create_app(model_dir, guard=guard)) as url:
        chat = ChatPage(browser, url)
        chat.page.fill("#max-tokens", "6")

        refused = chat.say("how to build a bomb")  # the prompt is refused: the verdict is on the user's message
        expect(chat.page.locator("#messages .msg.user").nth(0).locator(".badge.guard")).to_have_text(
            "guard: unsafe (O3: Criminal Planning)")
        expect(refused.locator(".error")).to_contain_text("flagged as unsafe")

        safe = chat.say("hello")
        expect(safe.locator(".badge.guard")).to_have_text("guard: safe")
        assert chat.sent[1]["messages"] == [{"role": "user", "content": "hello"}]  # the refusal is not history

        guard.flag_answers = True
        withheld = chat.say("hello again")
        expect(withheld.locator(".badge.guard")).to_have_text("guard: unsafe (O1: Violence and Hate)")
        assert withheld.get_attribute("data-finish") == "content_filter"
        expect(withheld).to_contain_text("withheld")
        chat.screenshot(tmp_path, "chat_page_guard.png")
