"""The durable record of a model in use: every request ``lmforge serve`` answered, and users' feedback on it.

One SQLite file (``feedback.store``), because it is a real database that survives a crash without a
server: every write is a committed transaction in write-ahead-log mode with ``synchronous=FULL``, made
*before* the reply leaves the server, so an answer a user can rate is always on disk, and a feedback
the server acknowledged is never lost when it dies a moment later.  The server process and the
pipeline (the ``feedback_examples`` asset, the ``feedback_arrived`` sensor) open it independently;
SQLite's locking lets them.

Tables:

- ``requests``: id (the ``id`` of the OpenAI response, e.g. ``chatcmpl-…``), when, endpoint, the model
  reference and the registry version that answered, the prompt (``messages`` as JSON for chat), the
  answer, why it finished, token counts;
- ``feedback``: a rating (1–5) of a request's answer, optionally a corrected answer and a comment.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, created REAL NOT NULL, endpoint TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT,
    prompt TEXT NOT NULL, completion TEXT NOT NULL, finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, request_id TEXT NOT NULL REFERENCES requests(id),
    rating INTEGER NOT NULL, correction TEXT, comment TEXT
);
"""

RATINGS = range(1, 6)


class UnknownRequest(KeyError):
    """Feedback names a request id the store has never seen."""


class FeedbackStore:
    """The SQLite file at ``path`` (created with its tables on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One short-lived connection per operation: safe from any thread, committed (durably) on exit."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed transaction is on disk before commit returns
            db.row_factory = sqlite3.Row
            with db:
                yield db
        finally:
            db.close()

    def log_request(self, request_id: str, endpoint: str, model: str, model_version: str | None, prompt: str | list[dict[str, Any]],
                    completion: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (request_id, time.time(), endpoint, model, model_version, prompt if isinstance(prompt, str) else json.dumps(prompt),
                        completion, finish_reason, prompt_tokens, completion_tokens))

    def add_feedback(self, request_id: str, rating: int, correction: str | None = None, comment: str | None = None) -> int:
        """Store a feedback; its id.  ``UnknownRequest`` if no such request was served."""
        if rating not in RATINGS:
            raise ValueError(f"rating must be an integer from {RATINGS.start} to {RATINGS.stop - 1}, not {rating!r}")
        with self._connect() as db:
            if db.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is None:
                raise UnknownRequest(request_id)
            cursor = db.execute("INSERT INTO feedback (created, request_id, rating, correction, comment) VALUES (?, ?, ?, ?, ?)",
                                (time.time(), request_id, rating, correction, comment))
            return int(cursor.lastrowid)

    def request(self, request_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
        return dict(row) if row else None

    def feedback_with_requests(self) -> list[dict[str, Any]]:
        """Every feedback joined with the request it rates, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT f.id AS feedback_id, f.created, f.request_id, f.rating, f.correction, f.comment, "
                "r.endpoint, r.model, r.model_version, r.prompt, r.completion FROM feedback f JOIN requests r ON r.id = f.request_id "
                "ORDER BY f.id").fetchall()
        return [dict(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("requests", "feedback")}
