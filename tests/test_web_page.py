"""The web page (stages/network/web/) in a real headless Chromium with a fake microphone playing the
speech sample, against a live `rtpipe serve --static` with the stand-in chain (the speech comes back):
the page waits for its slot, sends Ogg/Opus the server decodes, plays the answers, and draws the latency
panel; a second page waits while the only slot is busy; refusals (401, 1013) are said in words.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_support import ServeProcess, wait_until
from web_support import (
    WEB_DIR,
    RefusingServer,
    chromium_paths,
    console,
    fake_microphone_wav,
    ogg_pages,
    open_browser,
    page_status,
    wait_for_page,
)

_browser, _driver = chromium_paths()
pytestmark = [
    pytest.mark.skipif(
        _browser is None or _driver is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]
selenium = pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def microphone(folder) -> Path:
    return fake_microphone_wav(folder)


@pytest.fixture(scope="module")
def server(folder):
    with ServeProcess(folder, "--static", str(WEB_DIR), sessions=1) as serve:
        yield serve


@pytest.fixture
def browsers(microphone, tmp_path):
    """Opens headless Chromiums on demand (`browsers()`); all quit at the end."""
    opened = []

    def open_one():
        driver = open_browser(microphone, tmp_path / f"profile-{len(opened)}")
        opened.append(driver)
        return driver

    yield open_one
    for driver in opened:
        driver.quit()


def start(driver, url: str) -> None:
    driver.get(url)
    wait_for_page(driver, lambda s: s["state"] == "idle", 15, "the page to load")
    driver.find_element("id", "start").click()


def stop(driver) -> None:
    driver.find_element("id", "start").click()
    wait_for_page(driver, lambda s: s["state"] == "closed", 10, "the page to stop")


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "no screenshot"
    artifacts = os.environ.get("RTPIPE_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


PANEL_SCRIPT = """
const rows = [...document.querySelectorAll('#bars .bar-row')]
  .map((r) => [r.dataset.part, r.querySelector('.bar-value').textContent]);
const counters = Object.fromEntries([...document.querySelectorAll('#counters dd')]
  .map((d) => [d.dataset.counter, d.textContent]));
const line = document.querySelector('#bars .frame-line');
return {rows, counters, frame_line: line ? line.textContent : ''};
"""


def test_page_talks_through_the_server_and_shows_where_the_milliseconds_went(server, browsers, tmp_path):
    import sphn

    page = browsers()
    start(page, f"http://127.0.0.1:{server.port}/?text_temperature=0.7")
    wait_for_page(page, lambda s: s["handshake"] and s["state"] == "live", 30, "the handshake")
    status = wait_for_page(
        page,
        lambda s: (
            s["framesSent"] >= 40
            and s["framesPlayed"] >= 20
            and s["playedPeak"] > 0.01
            and (s["latency"] or {}).get("end_to_end_ms", {}).get("p50", 0) > 0
        ),
        45,
        "speech sent, the echo played and a latency report",
    )
    assert status["lastError"] == "", status["lastError"]
    latency = status["latency"]

    # the panel: a bar per part plus end to end, each with its numbers, and the page's own counters
    panel = page.execute_script(PANEL_SCRIPT)  # in one read: the page redraws it several times a second
    assert [name for name, _ in panel["rows"]] == ["end to end"] + [p["name"] for p in latency["parts"]]
    shown = panel["rows"][0][1]
    p50, p99 = (float(x) for x in re.findall(r"[\d.]+", shown))
    assert 0 < p50 <= p99, shown
    assert "80 ms frame" in panel["frame_line"]
    assert int(panel["counters"]["frames played"]) > 0 and panel["counters"]["page buffer"].endswith(" ms")
    assert status["arrivalGapMs"]["p50"] > 0, status  # the page's own measure of the answers' spacing
    save_screenshot(page, tmp_path, "web-page-live.png")

    # what the page sent: an Ogg Opus stream (RFC 7845) whose pages check out one by one...
    sent = base64.b64decode(page.execute_script("return window.rtpipe.sentOgg()"))
    pages = ogg_pages(sent)
    assert all(p.crc_ok for p in pages), [p.sequence for p in pages if not p.crc_ok]
    assert [p.sequence for p in pages] == list(range(len(pages)))
    assert len({p.serial for p in pages}) == 1
    head, tags, audio = pages[0], pages[1], pages[2:]
    assert head.flags == 0x02 and head.packets[0][:8] == b"OpusHead" and head.granule == 0
    assert head.packets[0][9] == 1 and int.from_bytes(head.packets[0][12:16], "little") == 24_000  # mono, 24 kHz
    assert tags.packets[0][:8] == b"OpusTags" and tags.granule == 0
    assert all(len(p.packets) == 2 for p in audio)  # two 20 ms packets a page, one page a message
    assert [p.granule for p in audio] == [1920 * (k + 1) for k in range(len(audio))]  # 48 kHz samples
    # ... and that Kyutai's sphn reads back to the speech (not silence)
    pcm = np.asarray(sphn.OpusStreamReader(24_000).append_bytes(sent), dtype=np.float32)
    assert pcm.size >= 30 * 1920, f"sphn read {pcm.size} samples from {len(sent)} bytes"
    assert float(np.sqrt(np.mean(pcm**2))) > 0.01, "the page sent silence"

    stop(page)
    # the server's report of this session: it heard the page's frames, with audio in most ticks
    report_path = server.report_dir / f"session-{latency['client']}.json"
    wait_until(report_path.exists, 30, f"{report_path.name}")
    report = wait_until(lambda: _json(report_path), 10, "a complete report")
    client = report["client"]
    assert client["frames_in"] >= 40, client
    assert client["underruns"] < client["frames_in"] / 2, client  # the edge counts a tick with no audio
    assert client["bad_messages"] == 0, client
    assert client["end_reason"] == "client closed", client


def test_a_second_page_waits_for_the_only_slot_and_gets_it_when_the_first_stops(server, browsers, tmp_path):
    first, second = browsers(), browsers()
    start(first, f"http://127.0.0.1:{server.port}/")
    wait_for_page(first, lambda s: s["state"] == "live" and s["framesPlayed"] > 0, 30, "the first page live")
    start(second, f"http://127.0.0.1:{server.port}/?page_rate=48000")  # and resampling to and from 24 kHz
    wait_for_page(second, lambda s: s["state"] == "waiting", 15, "the second page connected and queued")
    # while the first talks on for another 2 s, the second still waits: no handshake, no microphone
    sent = page_status(first)["framesSent"]
    wait_for_page(first, lambda s: s["framesSent"] >= sent + 25, 20, "the first page to talk on")
    waiting = page_status(second)
    assert waiting["state"] == "waiting" and not waiting["handshake"] and waiting["framesSent"] == 0, waiting
    assert second.find_element("id", "state").text == "waiting for a slot"
    save_screenshot(second, tmp_path, "web-page-waiting.png")

    stop(first)
    wait_for_page(second, lambda s: s["handshake"] and s["state"] == "live", 30, "the second page to get the slot")
    talking = wait_for_page(
        second,
        lambda s: s["framesSent"] >= 10 and s["framesPlayed"] >= 5 and s["playedPeak"] > 0.01,
        30,
        "the second page talking (at 48 kHz) and hearing its echo",
    )
    assert talking["contextRate"] == 48_000 and talking["lastError"] == "", talking
    stop(second)


@pytest.mark.parametrize(
    ("refuse", "words", "code"),
    [("401", "not authorized / could not connect", 1006), ("full", "server full, try again", 1013)],
)
def test_a_refused_page_says_why(browsers, refuse, words, code):
    with RefusingServer() as refusing:
        page = browsers()
        start(page, f"http://127.0.0.1:{refusing.port}/?refuse={refuse}")
        status = wait_for_page(page, lambda s: s["state"] in ("closed", "failed"), 15, "the refusal")
    assert status["closeCode"] == code and not status["handshake"], status
    assert words in page.find_element("id", "state").text + page.find_element("id", "error").text, console(page)
    if refuse == "full":
        assert "no free slot" in status["lastError"] or "no free slot" in page.find_element("id", "error").text


def _json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # being written
