"""Run a ConceptLensServer on its own event loop in a background thread: for tests, benchmarks and notebooks
that call it with the blocking client from the main thread.

    with BackgroundServer(config) as server:
        client = Client(f"127.0.0.1:{server.port}")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from .app import ConceptLensServer
from .config import ServerConfig
from .metrics import Metrics


class BackgroundServer:
    """Start on enter (port 0 picks a free port, read it from `.port`), stop gracefully on exit."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="conceptlens-server", daemon=True)
        self.server: ConceptLensServer | None = None
        self._metrics = metrics

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> ConceptLensServer:
        self._thread.start()

        async def start() -> ConceptLensServer:
            server = ConceptLensServer(self.config, self._metrics)
            await server.start()
            return server

        self.server = self.run(start())
        return self.server

    def __exit__(self, *_exc: object) -> None:
        try:
            if self.server is not None:
                self.run(self.server.stop(0.5))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
