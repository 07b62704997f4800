"""The web page in a real browser: Debian's chromium driven by Playwright for Python.

Nothing is downloaded: the browser is /usr/bin/chromium (.ci/run installs it with apt-get when missing;
Playwright's own browser download is never used), and everything the page needs comes from the Palette server. One browser
for the module. Set PALETTE_SCREENSHOT=docs/web-page.png to refresh the README's screenshot.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from http_fixtures import grpc_unary, url
from palette.v1 import palette_pb2 as pb
from server_fixtures import running_server, slow_steps

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("PALETTE_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle in the top left corner on a blue background"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: `apt-get install -y chromium` (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, server):
    """A fresh page (its own storage) on the server's page, with its script errors collected. The page's
    content security policy stays on (no eval), so the waits below are selectors, not wait_for_function."""
    context = browser.new_context(viewport={"width": 1000, "height": 1020}, accept_downloads=True)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url(server))
    return page


def tidy(value: float) -> str:
    """A float32 as the page shows it (six significant digits)."""
    return format(float(f"{value:.6g}"), "g")


def cards_on(page) -> list[dict]:
    """Every card in page order: its state, index, seed, score, place, previews shown and decoded width."""
    return page.eval_on_selector_all(".card", """cards => cards.map(card => {
        const img = card.querySelector('img');
        return {state: card.dataset.state, index: Number(card.dataset.index), seed: Number(card.dataset.seed),
                score: Number(card.dataset.score), previews: Number(card.dataset.previews || 0),
                place: card.querySelector('.rank')?.textContent, width: img && img.complete ? img.naturalWidth : 0};
    })""")


def download(page, card) -> tuple[str, bytes]:
    """Save a card's image with its Download link, as a person would: (file name, bytes)."""
    card.hover()
    with page.expect_download() as saved:
        card.query_selector("a[download]").click()
    return saved.value.suggested_filename, Path(saved.value.path()).read_bytes()


def test_draw_from_a_prompt_previews_then_ranked_images(browser, tmp_path):
    with running_server(http_port=0) as server:
        _, _, info = grpc_unary(server, "GetModelInfo", pb.GetModelInfoRequest())
        limits = info.limits
        page = open_page(browser, server)
        page.wait_for_selector("#footer:text-matches('^Palette ')")
        load_ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
        assert load_ms < 1000, f"the page took {load_ms:.0f} ms to load"
        # The settings start at the server's defaults.
        assert page.input_value("#num-images") == str(min(9, limits.max_images_per_request))
        assert page.input_value("#temperature") == tidy(limits.default_temperature)
        assert page.input_value("#top-k") == str(limits.default_top_k)
        assert page.input_value("#condition-scale") == tidy(limits.default_condition_scale)
        assert page.is_checked("#rank")

        page.click("#options summary")
        page.fill("#temperature", "1")  # more varied candidates than the default set's 0.5, for the picture
        page.fill("#seed", "1")
        with slow_steps(server, 0.03):  # slow enough that the previews are seen before the images
            page.fill("#prompt", PROMPT)
            page.press("#prompt", "Enter")
            page.wait_for_selector(".card[data-state=preview]", timeout=60_000)
            assert page.is_visible("#status")
            page.wait_for_selector("#summary:has-text('best first')", timeout=120_000)
        cards = cards_on(page)
        assert len(cards) == 9 and all(card["state"] == "final" for card in cards)
        assert sorted(card["index"] for card in cards) == list(range(9))
        assert all(card["previews"] >= 1 for card in cards), "every candidate showed a preview first"
        assert all(card["width"] == limits.image_width for card in cards), "every image decoded in the browser"
        scores = [card["score"] for card in cards]
        assert scores == sorted(scores, reverse=True), "best first"
        assert [card["place"].split(" · ")[0] for card in cards] == ["#1 best"] + [f"#{i}" for i in range(2, 10)]
        assert cards[0]["place"] == f"#1 best · {cards[0]['score']:.2f}"
        assert sorted(card["seed"] for card in cards) == list(range(1, 10))
        page.click("#options summary")
        page.screenshot(path=tmp_path / "web-page.png", full_page=True)
        if os.environ.get("PALETTE_SCREENSHOT"):
            shutil.copy(tmp_path / "web-page.png", os.environ["PALETTE_SCREENSHOT"])
        saved = [download(page, element) for element in page.query_selector_all(".card")]
        for card, (name, data) in zip(cards, saved):
            assert name.startswith("palette-a-red-circle-in-the-top") and name.endswith(f"-{card['seed']}.png")
            image = Image.open(io.BytesIO(data))
            assert image.format == "PNG" and image.size == (limits.image_width, limits.image_height)
        # The best image is the one gRPC gives for its seed.
        request = pb.GenerateRequest(prompt=PROMPT, num_images=1, seed=cards[0]["seed"], temperature=1.0)
        _, _, replies = grpc_unary(server, "Generate", request)
        assert saved[0][1] == next(r.image.data for r in replies if r.WhichOneof("event") == "image")


        # An over-long prompt: the button submits, and the server's message is shown.
        long_prompt = "x" * (limits.max_prompt_chars + 10)
        code, details, _ = grpc_unary(server, "Generate", pb.GenerateRequest(prompt=long_prompt))
        page.fill("#prompt", long_prompt)
        assert "over" in page.get_attribute("#prompt-count", "class")
        page.click("#draw")
        page.wait_for_selector("#error:not([hidden])")
        assert page.get_attribute("#error", "data-code") == "InvalidArgument"
        assert page.text_content("#error-text") == details
        assert page.eval_on_selector_all(".card", "cards => cards.length") == 0
        page.screenshot(path=tmp_path / "web-page-error.png")
        assert page.errors == []


def test_the_page_asks_for_a_token_when_the_server_wants_one(browser, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("browser:browser-token-1234\n")
    with running_server(http_port=0, auth_tokens=str(tokens)) as server:
        page = open_page(browser, server)
        page.wait_for_selector("#auth:not([hidden])")
        assert page.get_attribute("#error", "data-code") == "Unauthenticated"
        page.fill("#token", "browser-token-1234")
        page.click("#token-save")
        page.wait_for_selector("#footer:text-matches('^Palette ')")
        assert page.is_hidden("#auth") and page.is_hidden("#error")
        page.click("#options summary")
        page.fill("#num-images", "2")
        page.fill("#prompt", "a green square")
        page.click("#draw")
        page.wait_for_selector("#summary:has-text('2 images in')", timeout=60_000)
        assert page.eval_on_selector_all(".card[data-state=final]", "cards => cards.length") == 2
        assert page.errors == []
