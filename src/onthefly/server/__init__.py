"""The control server: FastAPI on 127.0.0.1 with a token, the dashboard page, a live WebSocket
feed. Talks to the engine only through its command queue and event bus."""

from __future__ import annotations

from .runner import DashboardServer

__all__ = ["DashboardServer"]
