"""SIGINT, SIGTERM and SIGHUP during a run: the first stops what is going on (the start,
the emission) and shortens the drain, the second ends the drain at once. The reports are
written either way. SIGHUP (a closed terminal, a dropped SSH session) ends a run like
SIGTERM, with exit code 129."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("fleetprobe")

INTERRUPT_DRAIN_S = 2.0


class Interruption:
    """Signal handling for one run (install with :meth:`installed`)."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.on_first: Callable[[], None] | None = None
        loop = asyncio.get_running_loop()
        self.first: asyncio.Future[None] = loop.create_future()
        self.again: asyncio.Future[None] = loop.create_future()

    @property
    def interrupted(self) -> bool:
        """Whether a signal came."""
        return self.signal_number is not None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT, SIGTERM and SIGHUP on the running loop while inside."""
        loop = asyncio.get_running_loop()
        numbers = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for number in numbers:
            loop.add_signal_handler(number, self._received, number)
        try:
            yield
        finally:
            for number in numbers:
                loop.remove_signal_handler(number)

    def _received(self, number: int) -> None:
        if self.signal_number is None:
            self.signal_number = number
            log.warning(
                "%s: stopping emission, draining for at most %gs (again to stop now)",
                signal.Signals(number).name,
                INTERRUPT_DRAIN_S,
            )
            self.first.set_result(None)
            if self.on_first is not None:
                self.on_first()
        elif not self.again.done():
            self.again.set_result(None)


async def linger_for_last_scrape(seconds: float, interruption: Interruption) -> None:
    """Keep /metrics up ``seconds`` after the reports, unless the run was interrupted or
    is while it waits (a signal ends the wait)."""
    if seconds <= 0 or interruption.interrupted:
        return
    log.info("reports written; /metrics stays up %gs for a last scrape", seconds)
    await asyncio.wait({interruption.first}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
