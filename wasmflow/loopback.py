"""An aiohttp application served on a loopback port from a background thread.

The stand-ins for GitHub and OpenAI (and the fixture GitHub of `wasmflow run --github-fixtures`) are driven by synchronous clients (PyGithub, `openai`) from tests and
from the demo, so each serves its app on its own event loop in a thread; subclasses only build `app()`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional, TypeVar

from aiohttp import web

S = TypeVar("S", bound="LoopbackServer")


class LoopbackServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port  # port 0: any free port, known after start()
        self.url = ""
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    def app(self) -> web.Application:
        raise NotImplementedError

    def start(self: S) -> S:
        """Serve in a background thread; `self.url` is the base URL. Raises what the server raised."""
        ready = threading.Event()
        error: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(self.app(), access_log=None)
            try:
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, self.host, self.port)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                self.url = f"http://{self.host}:{self.port}"
            except BaseException as exc:  # reported to the caller of start()
                error.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name=type(self).__name__, daemon=True)
        self._thread.start()
        ready.wait(10)
        if error:
            raise error[0]
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
