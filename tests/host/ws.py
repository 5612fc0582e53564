"""A websocket listener on the host's ``/ws`` (progress, executing, previews), in a thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp


class WsWatcher:
    """Collects every message the server sends to ``client_id`` (binary ones as their size)."""

    def __init__(self, url: str, client_id: str = "tests") -> None:
        self.url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.messages: list[dict] = []
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._connected.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self.messages.append({"type": "binary", "size": len(msg.data)})
                else:
                    break

    def __enter__(self) -> WsWatcher:
        self._thread.start()
        assert self._connected.wait(20), "could not connect to the server's websocket"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait_for(self, predicate, timeout: float = 120.0) -> dict:
        """The first message (old or new) for which ``predicate`` is true."""
        deadline, seen = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            for msg in self.messages[seen:]:
                if predicate(msg):
                    return msg
            seen = len(self.messages)
            time.sleep(0.05)
        raise TimeoutError(f"no matching websocket message in {timeout}s "
                           f"(last: {self.messages[-3:]})")

    def progress(self, prompt_id: str, node: str) -> list[tuple[int, int]]:
        return [(m["data"]["value"], m["data"]["max"]) for m in self.messages
                if m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id
                and m["data"].get("node") == node]
