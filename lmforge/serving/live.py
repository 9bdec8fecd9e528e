"""The version answering new requests, and the swap when the registry alias it was loaded from moves.

A server of ``models:/NAME@ALIAS`` polls the registry every ``serve.follow_seconds``; a new version is
loaded and warmed up beside the old one, then swapped in: requests admitted before the swap finish on
the old version (its engine closes after the last of them), new ones go to the new one, and every
answer records the version that produced it.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.params import ServeParams
from lmforge.serving.engine import Engine
from lmforge.serving.model import AliasFollower, ServedModel

log = logging.getLogger("lmforge.serve")


@dataclass
class Live:
    """A loaded version and the engine generating for it; swapped whole when the alias moves."""

    served: ServedModel
    engine: Engine
    users: int = 0  # requests admitted on it and not finished
    retired: bool = False  # swapped out: its engine closes when its last request has finished


class Deployment:
    """Which ``Live`` version answers new requests (``live``); with ``follow``, kept at the alias's version."""

    live: Live  # set by open(), before the first request is served

    def __init__(self, settings: ServeParams, follow: AliasFollower | None = None):
        self.settings, self.follow = settings, follow
        self._follower: asyncio.Task | None = None

    async def open(self, served: ServedModel) -> None:
        """Start ``served``'s engine, and the alias following if asked for."""
        self.live = await self._start(served)
        if self.follow is not None and self.settings.follow_seconds > 0:
            self._follower = asyncio.create_task(self._follow_alias(self.follow))

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        await asyncio.to_thread(self.live.engine.close)

    def hold(self) -> tuple[Live, Callable[[], None]]:
        """The version live now, held until the release (which may be called more than once): a request
        is answered to the end by the version that admitted it, even if the alias moves meanwhile."""
        live = self.live
        live.users += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                live.users -= 1
                if live.retired and not live.users:
                    self._retire(live)

        return live, release

    def swap(self, new: Live) -> None:
        """Send new requests to ``new``; the old version's engine closes when its last request has finished."""
        old, self.live = self.live, new
        log.warning("serve: %s moved from version %s to version %s: new requests go to it", new.served.ref, old.served.version,
                    new.served.version)
        old.retired = True
        if not old.users:
            self._retire(old)

    async def _start(self, served: ServedModel) -> Live:
        engine = await asyncio.to_thread(Engine, served, self.settings)
        await engine.warm_up()
        return Live(served, engine)

    async def _follow_alias(self, follow: AliasFollower) -> None:
        """Poll the alias; load a new version beside the old one, then swap.  A failed poll or load
        leaves the old version serving, and is tried again at the next poll."""
        while True:
            await asyncio.sleep(self.settings.follow_seconds)
            try:
                if await asyncio.to_thread(follow.version) == self.live.served.version:
                    continue
                new = await self._start(await asyncio.to_thread(follow.load))
            except Exception as exc:  # the registry unreachable, a broken version: keep serving what works
                log.warning("serve: could not follow %s: %s: %s", follow.ref, type(exc).__name__, exc)
                continue
            self.swap(new)

    @staticmethod
    def _retire(live: Live) -> None:
        """Close a swapped-out version's engine (in a worker thread: it joins the model threads)."""
        asyncio.get_running_loop().run_in_executor(None, live.engine.close)
