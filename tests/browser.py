"""A real headless Chromium (Debian's package) driven over the DevTools protocol: load a page
from a local HTTP server, wait for its load event, evaluate a script in it."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def chromium_available() -> bool:
    return shutil.which(CHROMIUM) is not None


@contextmanager
def serve_folder(folder: str | os.PathLike):
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def evaluate_in_page(url: str, expression: str, timeout_s: float = 60.0):
    """Open url in a fresh headless Chromium, wait for load, return the expression's value."""
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="vitad-chromium-")
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            calls = iter(range(1, 1 << 30))

            def call(method, **params):
                ident = next(calls)
                ws.send(json.dumps({"id": ident, "method": method, "params": params}))
                return ident

            def wait_for(pred):
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no answer from chromium for {url}")
                    msg = json.loads(ws.recv(timeout=left))
                    if pred(msg):
                        return msg

            call("Page.enable")
            call("Page.navigate", url=url)
            wait_for(lambda m: m.get("method") == "Page.loadEventFired")
            ident = call("Runtime.evaluate", expression=expression, returnByValue=True,
                         awaitPromise=True)
            msg = wait_for(lambda m: m.get("id") == ident)
            if "exceptionDetails" in msg["result"]:
                raise RuntimeError(f"script failed: {msg['result']['exceptionDetails']}")
            return msg["result"]["result"].get("value")
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
