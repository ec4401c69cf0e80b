"""The voice-chat page in a real browser: Debian's headless Chromium driven by Selenium through the system
chromedriver, with a fake microphone fed from a shipped clip, against a real gateway + tritonserver (taught
checkpoint). A screenshot of each run is saved under .build/artefacts/ (test artefact)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from stepaudio2.export.taught import CURRICULUM, clip_path

from .conftest import REPO
from .test_gateway import gateway  # noqa: F401 (fixture)
from .test_taught import runtime, served  # noqa: F401 (fixtures)

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs the 'dev' extra (selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (make test installs them)")
ARTEFACTS = REPO / ".build" / "artefacts"


@pytest.fixture()
def browser(tmp_path: Path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={clip_path(CURRICULUM.voice_chat_clip)}",
                 "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1000,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, cond, timeout: float = 120.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTEFACTS / "voice-page-timeout.png"))
    raise AssertionError(f"timed out waiting for {what}; status: {driver.find_element('id', 'status').text!r}")


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def test_voice_page_microphone_round_trip(browser, gateway) -> None:  # noqa: F811
    """Record from the fake microphone, send, and see the streamed reply text and the audio playing."""
    browser.get(gateway.url + "/")
    assert browser.title == "Step-Audio-2 voice chat"
    browser.find_element("id", "record").click()
    _wait(browser, lambda: _text(browser, "status") == "Recording...", 20, "recording to start")
    time.sleep(3.0)  # a little longer than the clip, which the fake device loops
    browser.find_element("id", "stop").click()
    _wait(browser, lambda: browser.find_element("id", "send").is_enabled(), 20, "the recording")
    assert _text(browser, "status").startswith("Recorded ")
    assert float(_text(browser, "status").split()[1]) > 1.5  # seconds of microphone audio captured
    browser.find_element("id", "send").click()
    _wait(browser, lambda: _text(browser, "transcript"), 120, "streamed reply text")
    _wait(browser, lambda: float(_text(browser, "played")) > 0, 120, "audio playback")
    _wait(browser, lambda: _text(browser, "status") == "Done.", 120, "the end of the reply")
    assert _text(browser, "ttfa").endswith(" s") and float(_text(browser, "ttfa")[:-2]) > 0
    assert float(_text(browser, "received")) > 0
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "voice-page-microphone.png"))


def test_voice_page_file_gets_the_taught_spoken_reply(browser, gateway) -> None:  # noqa: F811
    """A picked file is decoded by the browser into a 16 kHz wav; the reply is the taught one, spoken."""
    browser.get(gateway.url + "/")
    browser.find_element("id", "file").send_keys(str(clip_path(CURRICULUM.voice_chat_clip)))
    _wait(browser, lambda: browser.find_element("id", "send").is_enabled(), 20, "the file to decode")
    browser.find_element("id", "send").click()
    _wait(browser, lambda: _text(browser, "status") == "Done.", 120, "the end of the reply")
    assert _text(browser, "transcript") == CURRICULUM.voice_reply.text
    want = len(CURRICULUM.voice_reply.codes) * 960 / 24000
    assert float(_text(browser, "received")) == pytest.approx(want, abs=0.01)
    _wait(browser, lambda: float(_text(browser, "played")) > 0, 30, "audio playback")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "voice-page-file.png"))
