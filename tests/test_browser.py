"""
The chat page in a real browser: Debian's chromium driven by Playwright (no browser download)
against a real chat_web process serving the cycle model (helpers/serving_util.py), whose replies are known:
the page loads, a message gets a streamed reply, the stop button stops it (and the server frees the
row), the conversation survives a reload and goes on with its history, and "New chat" clears it.
"""

import os
import shutil
import time

import httpx
import pytest

from helpers.serving_util import ServerProcess, cycle_model, cycle_text, save_for_serving

CHROMIUM = os.environ.get("NANOCHAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"chromium not installed at {CHROMIUM} (apt-get install -y chromium)")]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser") / "base"
    # a long context so that the reply (thousands of tokens/s from this tiny model) outlasts the clicks
    save_for_serving(base, cycle_model(sequence_len=8192), "cycle")
    srv = ServerProcess(base, "--max-new-tokens", 60000, log_path=base.parent / "chat_web.log").wait_ready()
    yield srv
    srv.terminate()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where chromium's own sandbox cannot start
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 900, "height": 700})
        yield page
        browser.close()


def assistant_text(page, i=-1):
    """Text of the i-th assistant bubble without its meta line."""
    return page.locator(".msg.assistant").nth(i).evaluate("el => el.firstChild ? el.firstChild.textContent : ''")


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_chat_page(page, server, tmp_path):
    expect = sync_api.expect
    page.goto(server.url + "/")
    expect(page.locator("#model-name")).to_have_text("nanochat-sft-cycle-step1")

    # a message gets a streamed reply
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    expect(page.locator(".msg.user")).to_have_text("Hello there")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    first = wait_for(lambda: assistant_text(page))
    later = wait_for(lambda: len(t := assistant_text(page)) > len(first) + 20 and t)
    assert later.startswith(first) and later == cycle_text(len(later))  # grew in place, token by token

    # the stop button ends it; the page and the server both let go
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".msg.assistant .meta")).to_contain_text("stopped")
    stopped = assistant_text(page)
    time.sleep(0.5)
    assert assistant_text(page) == stopped and stopped == cycle_text(len(stopped)) and len(stopped) < 60000
    wait_for(lambda: (h := httpx.get(server.url + "/health").json())["in_flight"] == 0 and h["replicas"][0]["rows"] == 0)

    # the conversation survives a reload and continues with its history; max tokens applies
    page.reload()
    expect(page.locator(".msg")).to_have_count(2)
    page.fill("#max-tokens", "30")
    page.fill("#input", "And again?")
    page.click("#send")
    expect(page.locator(".msg.assistant").nth(1).locator(".meta")).to_contain_text("cut at max tokens")
    assert assistant_text(page) == cycle_text(30)
    assert "30 tokens" in page.locator(".msg.assistant").nth(1).locator(".meta").inner_text()
    page.screenshot(path=str(tmp_path / "chat.png"))

    # New chat clears the page and the stored history
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    page.reload()
    expect(page.locator(".msg")).to_have_count(0)
