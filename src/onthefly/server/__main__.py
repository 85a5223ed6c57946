"""``python -m onthefly.server``: the dashboard server process (see :mod:`onthefly.server.process`)."""

import sys

from .process import serve_from_stdin

sys.exit(serve_from_stdin())
