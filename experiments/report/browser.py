"""Open a local page in headless Chromium and say how it loaded.

For checking ``report.html`` (the tests) and taking its screenshot (``python -m
experiments.report FOLDER --screenshot PNG``). It speaks the DevTools protocol over
``--remote-debugging-pipe`` (NUL-separated JSON on file descriptors 3 and 4), so it needs no
port, no websocket library and nothing beyond the standard library and a ``chromium`` binary
(Debian: ``apt-get install chromium``). Every wait is bounded, and the browser is killed on
the way out whatever happened.

What it reports (:class:`PageCheck`): console errors, uncaught exceptions and failed loads;
every ``<img>`` with its natural width once decoding settled (0: it did not decode); which of
the selectors asked about are on the page; every URL the page requested (a self-contained page
requests only itself and ``data:`` URIs).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["BrowserError", "PageCheck", "find_chromium", "check_page"]

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# what the page says of itself once its images have settled (decode() rejects a broken image)
_PROBE = """
Promise.all([...document.images].map(i => i.decode().catch(() => null))).then(() => JSON.stringify({
  title: document.title,
  height: Math.ceil(document.documentElement.scrollHeight),
  images: [...document.images].map(i => ({alt: i.alt, naturalWidth: i.naturalWidth, complete: i.complete})),
  found: Object.fromEntries(%s.map(s => [s, document.querySelector(s) !== null])),
}))
"""


class BrowserError(RuntimeError):
    """Chromium did not start, answer or load the page in time; the message says which."""


@dataclass(frozen=True)
class PageCheck:
    title: str
    height: int  # the page's full height in CSS pixels
    errors: list[str]  # console errors, uncaught exceptions, failed loads
    images: list[dict[str, Any]]  # per <img>: alt, naturalWidth, complete
    found: dict[str, bool]  # selector -> on the page
    requests: list[str] = field(default_factory=list)  # every URL the page requested (first 100 characters)

    @property
    def broken_images(self) -> list[str]:
        return [i["alt"] or "(no alt)" for i in self.images if not i["naturalWidth"]]


def find_chromium() -> str | None:
    """The first Chromium or Chrome binary on PATH, or None."""
    return next((p for p in map(shutil.which, _NAMES) if p), None)


class _Pipe:
    """One browser process and the protocol on its pipe; events are kept as they come."""

    def __init__(self, binary: str, profile: str, timeout: float) -> None:
        self.timeout = timeout
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()
        # the browser must find them at 3 and 4: lift them above 10 first (so that placing one
        # cannot overwrite the other), and let a small Python place them and exec the browser (no
        # preexec_fn: this process may have threads; dash cannot name descriptors above 9)
        ours = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome, from_chrome)]
        os.close(to_chrome)
        os.close(from_chrome)
        self.log = tempfile.TemporaryFile()
        flags = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--mute-audio",
            "--hide-scrollbars",
        ]
        place = f"import os, sys; os.dup2({ours[0]}, 3); os.dup2({ours[1]}, 4); os.execv(sys.argv[1], sys.argv[1:])"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", place, binary, *flags],
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=self.log,
                pass_fds=ours,
                start_new_session=True,
            )
        finally:
            for fd in ours:
                os.close(fd)
        self._buf = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline, f"the answer to {method}")
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read(deadline, method)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"chromium: no {what} within {self.timeout:g} s")
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited (code {self.proc.poll()}) before {what}: {self._tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\0")
        return json.loads(line)

    def _tail(self) -> str:
        self.log.seek(0)
        lines = [x for x in self.log.read().decode(errors="replace").splitlines() if x.strip()]
        return " | ".join(lines[-3:])[:400] or "(no output)"

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    os.write(self._w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                except OSError:
                    pass
                self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, 9)
                except ProcessLookupError:
                    pass
                self.proc.wait()
            for fd in (self._r, self._w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.log.close()


def _errors(events: Iterable[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"load failed: {p.get('errorText')}")
    return out


def check_page(
    path: str | Path,
    *,
    selectors: Iterable[str] = (),
    screenshot: str | Path | None = None,
    width: int = 1280,
    height: int = 900,
    full_page: bool = True,
    max_height: int = 12000,
    scale: float = 1.0,
    timeout: float = 60.0,
    binary: str | None = None,
) -> PageCheck:
    """Load ``path`` in headless Chromium at ``width`` x ``height`` CSS pixels, let its images
    decode, and report; with ``screenshot``, write a PNG of the page (the whole page up to
    ``max_height`` pixels when ``full_page``, else the first screen), ``scale`` times the page's
    size. Raises
    :class:`BrowserError` when there is no Chromium or it does not load the page in time."""
    binary = binary or find_chromium()
    if binary is None:
        raise BrowserError("no chromium on PATH (Debian: apt-get install chromium)")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        b = _Pipe(binary, profile, timeout)
        try:
            target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                b.send(f"{domain}.enable", session=s)
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            b.send("Emulation.setDeviceMetricsOverride", metrics, session=s)
            nav = b.send("Page.navigate", {"url": url}, session=s)
            if nav.get("errorText"):
                raise BrowserError(f"chromium could not open {url}: {nav['errorText']}")
            b.wait_for("Page.loadEventFired")
            probe = b.send(
                "Runtime.evaluate",
                {"expression": _PROBE % json.dumps(list(selectors)), "awaitPromise": True, "returnByValue": True},
                session=s,
            )
            if "exceptionDetails" in probe:
                raise BrowserError(f"the page probe failed: {probe['exceptionDetails'].get('text')}")
            seen = json.loads(probe["result"]["value"])
            if screenshot is not None:
                h = min(seen["height"], max_height) if full_page else height
                b.send("Emulation.setDeviceMetricsOverride", {**metrics, "height": h}, session=s)
                shot = b.send(
                    "Page.captureScreenshot",
                    {
                        "format": "png",
                        "captureBeyondViewport": True,
                        "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": scale},
                    },
                    session=s,
                )
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            requests = [
                e["params"]["request"]["url"][:100] for e in b.events if e.get("method") == "Network.requestWillBeSent"
            ]
            return PageCheck(
                title=seen["title"],
                height=seen["height"],
                errors=_errors(b.events),
                images=seen["images"],
                found=seen["found"],
                requests=requests,
            )
        finally:
            b.close()
