#!/usr/bin/env python3
"""Opens pages in headless Chromium and reports what they became.

    browser.py OUT_DIR URL[|SELECTOR] ...

For each URL: navigates, waits until the page sets `document.body.dataset.ready` and
SELECTOR (a CSS selector, default `body`) matches (at most 20 s), then writes
OUT_DIR/page-N.html (the rendered DOM) and OUT_DIR/page-N.png (a screenshot), and prints
one JSON line: {"url", "html", "png", "requests": [every URL the page requested]}.

It drives Chromium through the DevTools protocol over a pipe (--remote-debugging-pipe:
JSON messages separated by NUL on file descriptors 3 and 4), so it needs nothing but the
standard library and Chromium (`chromium-headless-shell` or `chromium`; TESSERA_CHROMIUM
names another). Exits non-zero, naming what failed, when a page does not get ready.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def chromium():
    for name in [os.environ.get("TESSERA_CHROMIUM"), "chromium-headless-shell", "chromium", "chromium-browser"]:
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium found: install Debian's chromium-headless-shell (scripts/test does) or set TESSERA_CHROMIUM")


class Browser:
    def __init__(self):
        # A Chromium that fails to start (it happens, rarely, on a loaded machine) is
        # started again, twice at most.
        for attempt in range(3):
            self.start()
            try:
                self.send("Browser.getVersion")
                return
            except (RuntimeError, OSError) as e:
                self.close()
                if attempt == 2:
                    sys.exit(f"Chromium did not start: {e}")

    def start(self):
        self.profile = tempfile.mkdtemp(prefix="tessera-chromium-")
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes answers on fd 4 (copied out of the way
        # first: a pipe may already sit on 3 or 4, and dup2 onto itself keeps close-on-exec).
        def fds():
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--window-size=1400,1000",
             f"--user-data-dir={self.profile}", "about:blank"],
            close_fds=False, preexec_fn=fds,
            stdout=subprocess.DEVNULL, stderr=None if os.environ.get("BROWSER_DEBUG") else subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf = b""
        self.next_id = 0
        self.events = []

    def send(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        want = self.next_id
        while True:
            m = self.read()
            if m.get("id") == want:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def read(self):
        while b"\0" not in self.buf:
            chunk = os.read(self.from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def visit(b, url, selector, out_dir, n):
    target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    b.send("Network.enable", {}, session)
    b.send("Page.enable", {}, session)
    b.events.clear()
    b.send("Page.navigate", {"url": url}, session)
    check = (f"document.body && document.body.dataset.ready === 'true' && "
             f"document.querySelector({json.dumps(selector)}) !== null")
    deadline = time.time() + 20
    while True:
        ready = b.send("Runtime.evaluate", {"expression": check, "returnByValue": True}, session)
        if ready.get("result", {}).get("value") is True:
            break
        if time.time() > deadline:
            html = b.send("Runtime.evaluate", {"expression": "document.documentElement.outerHTML", "returnByValue": True}, session)
            sys.exit(f"{url}: no {selector} within 20 s; the page was:\n{html.get('result', {}).get('value', '')[:4000]}")
        time.sleep(0.2)
    time.sleep(0.3)  # let a chart finish drawing after the element appears
    html = b.send("Runtime.evaluate", {"expression": "document.documentElement.outerHTML", "returnByValue": True}, session)["result"]["value"]
    png = base64.b64decode(b.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)["data"])
    requests = [e["params"]["request"]["url"] for e in b.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session]
    b.send("Target.closeTarget", {"targetId": target})
    html_path = os.path.join(out_dir, f"page-{n}.html")
    png_path = os.path.join(out_dir, f"page-{n}.png")
    with open(html_path, "w") as f:
        f.write(html)
    with open(png_path, "wb") as f:
        f.write(png)
    print(json.dumps({"url": url, "html": html_path, "png": png_path, "requests": requests}), flush=True)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    b = Browser()
    try:
        for n, arg in enumerate(sys.argv[2:]):
            url, _, selector = arg.partition("|")
            visit(b, url, selector or "body", out_dir, n)
    finally:
        b.close()


if __name__ == "__main__":
    main()
