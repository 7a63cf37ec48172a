"""A streaming request read on a background thread, for tests that stop a server mid-stream."""

from __future__ import annotations

import threading

import httpx


class BackgroundStream:
    """POST `body` to `url` with streaming and read the response to its end on a thread.
    `started` is set at the first bytes; `raw` holds every byte received so far."""

    def __init__(self, url: str, body: dict, timeout: float):
        self.url, self.body, self.timeout = url, body, timeout
        self.raw = b""
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=self.timeout) as r:
            for part in r.iter_raw():
                self.raw += part
                self.started.set()

    def join(self, timeout: float) -> bool:
        """Whether the stream ended within `timeout` seconds."""
        self.thread.join(timeout)
        return not self.thread.is_alive()
