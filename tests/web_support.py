"""Helpers for the web page's browser test: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by selenium, with a fake microphone that plays a WAV, and the page's `window.rtpipe` status.
"""

from __future__ import annotations

import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from serve_support import REPO, SPEECH_WAV

WEB_DIR = REPO / "stages" / "network" / "web"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_paths() -> tuple[str | None, str | None]:
    """(the browser, its driver) from PATH; either None when missing."""
    browser = next((p for name in CHROMIUM_NAMES if (p := shutil.which(name))), None)
    return browser, shutil.which("chromedriver")


def fake_microphone_wav(folder: Path) -> Path:
    """The speech sample as 16-bit PCM mono WAV, what Chromium's fake audio capture reads (it loops it)."""
    samples, rate = sf.read(str(SPEECH_WAV), dtype="float32")
    path = folder / "fake-microphone.wav"
    sf.write(str(path), np.asarray(samples, dtype=np.float32).reshape(-1), rate, subtype="PCM_16")
    return path


def open_browser(microphone_wav: Path, profile_dir: Path):
    """A headless Chromium whose microphone plays `microphone_wav` and whose pages may play audio."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",  # grant the microphone without asking
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone_wav}",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile_dir}",
        "--window-size=1100,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def page_status(driver) -> dict:
    """The page's window.rtpipe, as plain data."""
    return driver.execute_script("return window.rtpipe ? window.rtpipe.snapshot() : null") or {}


def wait_for_page(driver, predicate, timeout_s: float, what: str) -> dict:
    """Polls the page's status until `predicate(status)` holds (returns the status) or fails the test
    with the status and the browser's console."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = page_status(driver)
        if status and predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; page: {status}\n{console(driver)}")
        time.sleep(0.1)


def console(driver) -> str:
    """The browser's console messages so far (for a failure's message)."""
    try:
        return "\n".join(f"console: {e['level']} {e['message']}" for e in driver.get_log("browser"))
    except Exception as e:  # a driver without the log endpoint
        return f"(no console: {e})"


class RefusingServer:
    """The page's files and an /api/chat that refuses, on a thread: `?refuse=401` answers the upgrade
    with 401 (as `rtpipe serve --auth-token-file` does to a wrong token), `?refuse=full` accepts, says
    0x05 "no free slot" and closes with 1013 (as a full server's queue timeout does)."""

    def __init__(self):
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="refusing-server", daemon=True)
        self.port = 0
        self.runner = None

    async def _start(self) -> None:
        from aiohttp import web

        async def chat(request: web.Request):
            if request.query.get("refuse") == "401":
                return web.Response(status=401, text="missing or wrong kyutai-api-key header / auth_id parameter\n")
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_bytes(b"\x05no free slot within 1 s; try again")
            await ws.close(code=1013, message=b"no free slot")
            return ws

        async def index(request: web.Request):
            return web.FileResponse(WEB_DIR / "index.html")

        app = web.Application()
        app.router.add_get("/api/chat", chat)
        app.router.add_get("/", index)
        app.router.add_static("/", WEB_DIR)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def __enter__(self) -> RefusingServer:
        import asyncio

        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# --- Ogg, read independently of the page's JS, to check what it wrote ---------------------------------


@dataclass
class OggPage:
    flags: int
    granule: int
    serial: int
    sequence: int
    crc_ok: bool
    packets: list[bytes]


def ogg_crc32(data: bytes) -> int:
    """Ogg's CRC-32 (RFC 3533): polynomial 0x04c11db7, not reflected, initial 0, no final xor."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
            crc &= 0xFFFFFFFF
    return crc


def ogg_pages(data: bytes) -> list[OggPage]:
    """The pages of an Ogg stream, each packet whole (none here spans pages); AssertionError on bytes
    that are not back-to-back pages."""
    pages, at = [], 0
    while at < len(data):
        assert data[at : at + 4] == b"OggS", f"no Ogg capture pattern at byte {at}"
        flags, granule, serial, sequence, crc, segments = struct.unpack_from("<xBqIIIB", data, at + 4)
        lacing = data[at + 27 : at + 27 + segments]
        end = at + 27 + segments + sum(lacing)
        page = bytearray(data[at:end])
        page[22:26] = b"\0\0\0\0"
        packets, start, size = [], at + 27 + segments, 0
        for n in lacing:
            size += n
            if n < 255:
                packets.append(data[start : start + size])
                start, size = start + size, 0
        pages.append(OggPage(flags, granule, serial, sequence, ogg_crc32(bytes(page)) == crc, packets))
        at = end
    return pages
