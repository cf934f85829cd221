"""Headless Chromium driven over the DevTools protocol through a pipe (--remote-debugging-pipe):
no websocket library, no open port. Used by tests/test_html.py and docs/screenshots.py.

`open_page(html_file)` loads a page with the network blocked three ways (a proxy that refuses,
host names that do not resolve, and DevTools' offline emulation), collects console errors,
uncaught exceptions and every request, and can evaluate JavaScript and take screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("RELUSCOPE_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _binary(executable: str) -> str:
    """Debian's /usr/bin/chromium is a shell launcher; the browser itself lies beside its libraries."""
    real = Path("/usr/lib/chromium/chromium")
    if Path(executable).resolve() == Path("/usr/bin/chromium") and real.exists():
        return str(real)
    return executable


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium; `session` is the DevTools session of its one page."""

    def __init__(self, executable: str, *, width: int = 1400, height: int = 2400) -> None:
        self.profile = tempfile.mkdtemp(prefix="reluscope-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def pipes() -> None:  # chromium reads commands on fd 3 and writes replies on fd 4
            read, write = os.dup(to_child_r), os.dup(from_child_w)  # neither may be 3 or 4 while moved
            while read in (3, 4) or write in (3, 4):
                read, write = os.dup(read), os.dup(write)
            os.dup2(read, 3)
            os.dup2(write, 4)

        args = [_binary(executable), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                "--host-resolver-rules=MAP * ~NOTFOUND", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=pipes, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.width, self.height = width, height
        self.session: str | None = None

    # -- the protocol
    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                    self._cond.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = "page",
             timeout: float = 60.0) -> dict[str, Any]:
        with self._cond:
            self._next += 1
            ident = self._next
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        sid = self.session if session == "page" else session
        if sid:
            message["sessionId"] = sid
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise CDPError(f"{method}: no reply from chromium")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    # -- a page with the network blocked
    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=None)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=None)["sessionId"]
        for method in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
            self.send(method)
        self.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                       "uploadThroughput": -1})
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})

    def navigate(self, path: Path) -> None:
        self.send("Page.navigate", {"url": path.resolve().as_uri()})

    def evaluate(self, expression: str, *, timeout: float = 60.0) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            raise CDPError(f"evaluate: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise CDPError(f"timed out waiting for {expression}")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries, as text."""
        found = []
        with self._cond:
            events = list(self.events)
        for event in events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                    for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append("exception: " + str(details.get("exception", {}).get("description") or details.get("text")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append("log: " + str(params["entry"].get("text")) + " " + str(params["entry"].get("url", "")))
        return found

    def requests(self) -> list[str]:
        with self._cond:
            return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, *, full_page: bool = False, clip: dict[str, float] | None = None) -> None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"]}
        if clip is not None:
            params.update(clip={**clip, "scale": 1}, captureBeyondViewport=True)
        data = self.send("Page.captureScreenshot", params, timeout=120)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", session=None, timeout=10)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# What each chart drew: its SVG, and its data marks (bars, points, line paths, heatmap images).
CHART_MARKS_JS = """
(() => Array.from(document.querySelectorAll('.chart')).map(div => ({
  name: div.getAttribute('data-fig'),
  empty: div.classList.contains('empty'),
  svg: div.querySelectorAll('svg.main-svg').length,
  bars: div.querySelectorAll('.barlayer .point path').length,
  points: div.querySelectorAll('.scatterlayer .points path').length,
  lines: div.querySelectorAll('.scatterlayer .js-line').length,
  heatmap: div.querySelectorAll('.heatmaplayer image').length,
  width: div.getBoundingClientRect().width,
  height: div.getBoundingClientRect().height,
})))()
"""


def load_report_page(browser: Browser, page: Path, timeout: float = 90.0) -> dict[str, Any]:
    """Open `page`, wait until its charts are drawn; return window.__reluscope and the marks per chart."""
    browser.open_page()
    started = time.monotonic()
    browser.navigate(page)
    state = browser.wait_for("window.__reluscope && window.__reluscope.ready && window.__reluscope", timeout)
    state["wall_s"] = time.monotonic() - started
    state["charts"] = browser.evaluate(CHART_MARKS_JS)
    return state
