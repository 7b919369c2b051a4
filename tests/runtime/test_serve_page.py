"""The chat page at / in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
type a message, press Enter, watch the streamed answer appear with its tokens/s."""

from __future__ import annotations

import shutil
import tempfile

import pytest

pytest.importorskip("fastapi")

from bitnet_train.runtime import Engine, Generator  # noqa: E402
from bitnet_train.runtime.serve.app import create_app  # noqa: E402

import tiny_files  # noqa: E402
from serve_helpers import ServerThread, WrappedEngine  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("Chromium is not installed here (Debian: apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="bitnet-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    except Exception as e:  # noqa: BLE001 - a browser that cannot start here is a skip, not a failure
        pytest.skip(f"Chromium did not start: {str(e).splitlines()[0]}")
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_chat_page_streams_an_answer(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    files = tiny_files.build(str(tmp_path), 256)
    engine = Engine.load(files["model"], threads=1)
    server = ServerThread(create_app(WrappedEngine(engine, delay=0.02), model_name="tiny"))  # visibly streamed
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30, poll_frequency=0.01)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("40")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        box = browser.find_element(By.ID, "input")
        box.send_keys("To be, or not to be")
        box.send_keys(Keys.ENTER)
        answer = wait.until(lambda d: d.find_element(By.ID, "answer-1"))
        partial = wait.until(lambda d: answer.text if answer.text and "done" not in answer.get_attribute("class") else None)
        wait.until(lambda d: "done" in answer.get_attribute("class"))
        final = answer.text
        stats = browser.find_element(By.CSS_SELECTOR, ".stats").text
    finally:
        server.stop()
    assert partial and len(partial) < len(final)  # text appeared before the answer was complete
    gen = Generator(engine)
    prompt = gen.tokenizer.encode(gen.tokenizer.apply_chat_template([{"role": "user", "content": "To be, or not to be"}]),
                                  add_special_tokens=False)
    want = gen.generate([prompt], max_new_tokens=40)[0].text
    assert final == want.strip() or final == want  # the page shows the text the engine generates (the DOM trims)
    assert "tokens/s" in stats and browser.find_element(By.CSS_SELECTOR, ".user").text == "To be, or not to be"
