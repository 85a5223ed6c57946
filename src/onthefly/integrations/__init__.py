"""Callbacks for other training libraries (Lightning, Hugging Face Trainer).

Each integration is a module of its own that imports its library lazily: only when the module
itself is imported (``from onthefly.integrations.lightning import OnTheFlyCallback``), so
On The Fly never needs those libraries installed.
"""

from __future__ import annotations

__all__: list[str] = []
