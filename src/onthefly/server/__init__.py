"""The control server: FastAPI on 127.0.0.1 with a token, the dashboard page, a live WebSocket
feed. It runs in its own process and talks to the training process only through the channel
(commands in; the event feed and live state out)."""

from __future__ import annotations

from .process import DashboardProcess
from .runner import DashboardServer

__all__ = ["DashboardProcess", "DashboardServer"]
