"""The gradio web demo driven in a real headless Chromium (selenium): upload a film, summary, follow-up, screenshot.

Needs the 'demo' extra (gradio), selenium, and Debian's chromium + chromium-driver (`make install` sets them up);
skipped with the install command when one is missing. The model is a tiny random one, so the answers are
gibberish: the test checks that the browser shows exactly what the Python API answers for the same questions.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
from conftest import REPO, make_tiny_xraygpt
from PIL import Image

from xraygpt.assets import pediatric_cxr_jpegs
from xraygpt.chat import Conversation
from xraygpt.conversation import DEFAULT_INSTRUCTION

gr = pytest.importorskip("gradio", reason="the web demo needs the 'demo' extra: pip install 'xraygpt[demo]'")
from xraygpt import web  # noqa: E402  (after the gradio check)

MAX_NEW_TOKENS = 8
FOLLOW_UP = "Is the heart enlarged?"
ARTIFACTS = REPO / ".cache" / "test-artifacts"


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_xraygpt(tokenizer)


@pytest.fixture(scope="module")
def handlers(model):
    return web.DemoHandlers(model, web.DemoSettings(max_new_tokens=MAX_NEW_TOKENS))


def test_handlers_summarise_then_answer_follow_ups(handlers, model):
    film = pediatric_cxr_jpegs()[0]
    chat, preview, conv, _ = handlers.start(str(film), beams=1, temperature=0.0)
    expected = Conversation(model, film, max_new_tokens=MAX_NEW_TOKENS)
    first = expected.ask(DEFAULT_INSTRUCTION)
    assert chat == [{"role": "user", "content": DEFAULT_INSTRUCTION}, {"role": "assistant", "content": first}]
    assert isinstance(preview, Image.Image) and preview.mode == "L"
    chat, conv, box = handlers.reply(f"  {FOLLOW_UP} ", chat, conv, beams=1, temperature=0.0)
    assert chat[-2:] == [{"role": "user", "content": FOLLOW_UP},
                         {"role": "assistant", "content": expected.ask(FOLLOW_UP)}]
    assert box == "" and len(conv.history) == 2
    assert handlers.clear_chat(conv).history == [] and conv.image_embeds is not None


def test_handlers_refuse_clearly(handlers, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(gr.Error, match="Cannot read notes.png"):
        handlers.start(str(tmp_path / "notes.png"), 1, 0.0)
    with pytest.raises(gr.Error, match="Upload a chest film first"):
        handlers.start(None, 1, 0.0)
    with pytest.raises(gr.Error, match="Upload a chest film first"):
        handlers.reply("Why?", [], None, 1, 0.0)


def test_decoding_controls_map_to_generation_settings():
    assert web.decoding(1, 0.0, 8) == dict(num_beams=1, do_sample=False, temperature=1.0, max_new_tokens=8)
    assert web.decoding(3.0, 0.7, 8) == dict(num_beams=3, do_sample=True, temperature=0.7, max_new_tokens=8)


def test_binds_loopback_by_default_and_warns_before_sharing(capsys):
    opts = web.launch_options()
    assert opts["server_name"] == "127.0.0.1" and opts["share"] is False
    assert capsys.readouterr().err == ""
    assert web.launch_options(share=True)["share"] is True
    assert "WARNING: --share publishes this demo on a public gradio.live link" in capsys.readouterr().err
    web.launch_options(host="0.0.0.0")
    assert "reachable from other machines" in capsys.readouterr().err
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    script = module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--ckpt", "x"])
    assert args.host == "127.0.0.1" and args.share is False


# ------------------------------------------------------------------------------------------------ browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("the browser test needs Chromium and its driver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: Chromium refuses to run as root (containers, CI) with its sandbox on
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _visible_text(text: str) -> str:
    """What a browser shows of a string: printable characters, whitespace collapsed."""
    return " ".join("".join(ch for ch in text if ch.isprintable()).split())


def test_browser_upload_summary_and_follow_up(model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    film = pediatric_cxr_jpegs()[0]
    expected = Conversation(model, film, max_new_tokens=MAX_NEW_TOKENS)
    answers = [expected.ask(DEFAULT_INSTRUCTION), expected.ask(FOLLOW_UP)]
    browser = _browser()
    demo = web.launch(model, port=_free_port(), settings=web.DemoSettings(max_new_tokens=MAX_NEW_TOKENS), block=False)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:") and demo.share_url is None
        browser.get(demo.local_url)
        wait = WebDriverWait(browser, 120, poll_frequency=0.25)

        def bot_texts(_=None) -> list[str]:
            return [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")]

        upload = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#film input[type='file']"))[0]
        t0 = time.perf_counter()
        upload.send_keys(str(film))
        wait.until(lambda b: len(bot_texts()) >= 1 and bot_texts()[0])
        assert bot_texts() == [_visible_text(answers[0])]
        user = browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='user']")
        assert [e.text.strip() for e in user] == [DEFAULT_INSTRUCTION]

        box = wait.until(lambda b: [e for e in b.find_elements(By.CSS_SELECTOR, "#question textarea, #question input")
                                    if e.is_enabled()])[0]
        box.send_keys(FOLLOW_UP)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: len(bot_texts()) >= 2 and bot_texts()[1])
        assert bot_texts() == [_visible_text(a) for a in answers]
        assert all(bot_texts())  # non-empty answers on screen
        user = [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='user']")]
        assert user == [DEFAULT_INSTRUCTION, FOLLOW_UP]
        seconds = time.perf_counter() - t0

        shot = tmp_path / "web_demo.png"
        assert browser.save_screenshot(str(shot))
        with Image.open(shot) as image:
            assert image.size[0] >= 1000 and image.getextrema() != ((255, 255), (255, 255), (255, 255))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "web_demo.png")
        print(f"upload -> two answers in {seconds:.1f} s; screenshot: {ARTIFACTS / 'web_demo.png'}")
        film_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "film")
        uploads = [p for p in Path(film_box.GRADIO_CACHE).rglob(film.name)]
        assert uploads, "the upload should sit in gradio's cache while the server runs"
    finally:
        browser.quit()
        demo.close()
    assert not any(p.exists() for p in uploads)  # uploaded films are deleted when the server stops
