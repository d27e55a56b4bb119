"""Drive a plain SimPy environment from asyncio, in step with the wall clock.

SimPy's ``RealtimeEnvironment`` sleeps with ``time.sleep`` and would stall the event loop.
Instead the :class:`FleetClock` sleeps on the loop until the next scheduled event is due,
steps the environment through every event up to the simulated time that matches the wall
clock (times ``speed``), and hands every emission to the caller with its *intended*
monotonic time.

When the caller cannot keep up, the clock falls behind, and catching up would step and
hand over a long backlog in one go, during which nothing else runs on the loop: the
observers' reads would wait, their stamps would come late, and a broker would drop what
a subscriber that slow cannot take. So it works in slices and lets the loop run between
them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import simpy

from fleetprobe.simulator.fleet import Emission

EmissionHandler = Callable[[Emission, int], Awaitable[None]]

SLICE_NS = 5_000_000
"""The longest the clock works before it lets the loop run (reads, deadlines)."""
STEP_BATCH = 256
"""Emissions stepped out of the model at most before they are handed over."""


class FleetClock:
    """Advances ``env`` at ``speed`` simulated seconds per wall second.

    Args:
        env: a plain ``simpy.Environment`` whose processes append to ``outbox``.
        outbox: the list the fleet's processes append emissions to.
        speed: simulated seconds per wall second.
    """

    def __init__(self, env: simpy.Environment, outbox: list[Emission], speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.env = env
        self.speed = speed
        self._outbox = outbox
        self._stopping = asyncio.Event()
        self.start_ns: int | None = None

    def stop(self) -> None:
        """Stop emitting soon: the running :meth:`run` returns before the next emission."""
        self._stopping.set()

    def intended_ns(self, t_sim: float) -> int:
        """The monotonic time at which simulated time ``t_sim`` is due."""
        if self.start_ns is None:
            raise RuntimeError("the clock has not started")
        return self.start_ns + round(t_sim / self.speed * 1e9)

    async def run(self, duration_s: float, handle: EmissionHandler) -> None:
        """Emit for ``duration_s`` wall seconds, awaiting ``handle(emission, intended_ns)``.

        Emissions come in sim-time order. When ``handle`` is slow, later emissions are
        handed over late rather than skipped: the lag is the caller's to measure.
        """
        env, outbox = self.env, self._outbox
        end_sim = duration_s * self.speed
        # Let every process take its first steps (due now) before the wall clock starts:
        # for 10,000 vehicles they take ~0.1 s, which would show as the emission lag of
        # the first signals. What they emit now is still sent at the start.
        while env.peek() <= env.now:
            env.step()
        self.start_ns = time.monotonic_ns() - round(env.now / self.speed * 1e9)
        slice_ends_ns = time.monotonic_ns() + SLICE_NS
        while not self._stopping.is_set():
            next_t = env.peek()
            if next_t >= end_sim:
                break
            wait_s = (self.intended_ns(next_t) - time.monotonic_ns()) / 1e9
            if wait_s > 0:
                try:
                    async with asyncio.timeout(wait_s):
                        await self._stopping.wait()
                except TimeoutError:
                    pass
                slice_ends_ns = time.monotonic_ns() + SLICE_NS
                continue
            due_sim = min((time.monotonic_ns() - self.start_ns) / 1e9 * self.speed, end_sim)
            # step(), not run(until): SimPy 4.1 leaves run's stop event queued, and peek()
            # would then report it as the next event, turning the wait above into a spin.
            while env.peek() <= due_sim and len(outbox) < STEP_BATCH:
                env.step()
            for emission in outbox:
                if self._stopping.is_set():
                    break
                await handle(emission, self.intended_ns(emission.t_sim))
                slice_ends_ns = await _let_loop_run(slice_ends_ns)
            outbox.clear()
            slice_ends_ns = await _let_loop_run(slice_ends_ns)


async def _let_loop_run(slice_ends_ns: int) -> int:
    """Once the slice ending at ``slice_ends_ns`` is over, let the loop run (reads,
    deadlines) before going on; returns when the next slice ends."""
    if time.monotonic_ns() < slice_ends_ns:
        return slice_ends_ns
    await asyncio.sleep(0)
    return time.monotonic_ns() + SLICE_NS
