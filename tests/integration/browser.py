"""Open a page in a real headless Chromium (Debian's package, installed by `make test`) through the DevTools
protocol: every request the page makes is recorded, its DOM can be queried once rendered, and a screenshot saved."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable


def chromium() -> str:
    exe = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if exe is None:
        raise AssertionError("no headless Chromium on PATH: `make test` installs Debian's chromium (apt-get install chromium)")
    return exe


class Page:
    """One tab of a fresh headless browser (its own profile, background networking off)."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1400,1800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ws_url = None
        deadline = time.monotonic() + 60
        while ws_url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self.proc.returncode}")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            ws_url = m.group(1) if m else None
        if ws_url is None:
            raise AssertionError("chromium did not open its DevTools port within 60 s")
        self.ws = connect(ws_url, max_size=64 * 1024 * 1024)
        self._id = 0
        self.requests: list[str] = []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self._call(f"{domain}.enable", session=True)

    def _call(self, method: str, params: dict | None = None, session: bool = False) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("method") == "Network.requestWillBeSent" and reply.get("sessionId") == getattr(self, "session", None):
                self.requests.append(reply["params"]["request"]["url"])
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def goto(self, url: str) -> None:
        self._call("Page.navigate", {"url": url}, session=True)

    def js(self, expression: str) -> Any:
        out = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        return out.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float = 60, what: str = "the page") -> Any:
        """Evaluate EXPRESSION until it is truthy (the page's own refreshes keep coming in meanwhile)."""
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")

    def text(self, selector: str) -> str:
        return self.js(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''") or ""

    def screenshot(self, path: Path) -> Path:
        data = self._call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait(30)


def open_page(url: str, profile: Path, ready: str, check: Callable[[Page], None], shot: Path) -> list[str]:
    """Open URL, wait until the JS expression READY holds, save a screenshot, run CHECK; the URLs it requested."""
    page = Page(profile)
    try:
        page.goto(url)
        page.wait(ready, what=f"{url} to render")
        page.screenshot(shot)
        check(page)
        page.js("1")  # read the events still queued
        return list(page.requests)
    finally:
        page.close()
