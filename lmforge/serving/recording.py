"""Feedback recording: every answer the server sends, and every rating of one, in the feedback store.

The feedback loop learns from id → prompt → answer → rating, so an answer is recorded *before* it
is sent (a client can rate only what the store already holds) and a feedback before it is acknowledged
(an acknowledged feedback survives a server killed a moment later).  The store's writes are blocking
SQLite transactions: they run off the event loop.
"""

import asyncio
from typing import Any

from lmforge.feedback_store import FeedbackStore, UnknownRequest
from lmforge.serving.requests import FeedbackRequest
from lmforge.serving.wire import RequestError
from models.batching import Completion


class Recorder:
    """Writes the answers of the model served as ``model`` (the name clients send) to ``store``."""

    def __init__(self, store: FeedbackStore, model: str):
        self.store, self.model = store, model

    async def answer(self, request_id: str, endpoint: str, version: str | None, prompt: str | list[dict[str, Any]],
                     prompt_tokens: int, row: Completion) -> None:
        """Record a finished answer under its response ``id``, with the registry ``version`` that produced it."""
        await asyncio.to_thread(self.store.log_request, request_id, endpoint, self.model, version, prompt, row.text,
                                row.finish_reason, prompt_tokens, len(row.token_ids))

    async def feedback(self, req: FeedbackRequest) -> int:
        """Record a rating (and correction) of an answer; its id.  A 404 for an answer not served here."""
        try:
            return await asyncio.to_thread(self.store.add_feedback, req.request_id, req.rating, req.correction, req.comment)
        except UnknownRequest:
            raise RequestError(f"no request with id '{req.request_id}' was served here", "request_id", status=404,
                               kind="not_found_error") from None
