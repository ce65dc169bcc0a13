"""The capability handlers the evaluator runs: one line per capability."""

from __future__ import annotations

from evaluator.runtime import Handler
from server.db import Database


def build(db: Database) -> list[Handler]:
    """Every handler, sharing one database pool."""
    return []
