"""A replica app that can never start: importing it fails (chaos scenario R11)."""

from __future__ import annotations

raise ImportError("chaos_broken: this app fails at import, every time")
