"""``traces.jsonl``: one line per followed signal, written when the signal is retired."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import PENDING, SKIPPED, FollowedSignal
from fleetprobe.core.times import iso_utc
from fleetprobe.probes.chains import ChainSpec

log = logging.getLogger("fleetprobe")


def trace_line(followed: FollowedSignal, chain: ChainSpec, run_id: str) -> dict[str, Any]:
    """The trace log entry of one followed signal.

    A hop's ``result`` is its counted result, as in every other output; a hop counted
    ``skipped`` keeps what it saw itself in ``own_result``; a hop read while the prober
    was blind says so (``prober_blind``: its latency is at most what it shows).
    """
    hops: dict[str, Any] = {}
    for h, spec in enumerate(chain.hops):
        counted = followed.counted_result(h)
        entry: dict[str, Any] = {"result": counted}
        own = followed.results[h]
        if counted == SKIPPED and own is not None:
            entry["own_result"] = own.value
        latency, step = followed.latency_s(h), followed.step_s(h)
        if latency is not None:
            entry["latency_s"] = round(latency, 7)
            if not followed.latency_known(h):
                entry["prober_blind"] = True  # read late: the latency is at most this
        if step is not None:
            entry["step_s"] = round(step, 7)
        if followed.duplicates and h in followed.duplicates:
            entry["duplicates"] = followed.duplicates[h]
        if followed.details and h in followed.details:
            entry["detail"] = followed.details[h]
        hops[spec.name] = entry
    verdict = followed.verdict.value if followed.verdict is not None else PENDING
    failed_hop = chain.hops[followed.failed_hop].name if followed.failed_hop is not None else None
    return {
        "trace_id": followed.trace_id,
        "run_id": run_id,
        "chain": chain.name,
        "signal": followed.signal,
        "vin": followed.vin,
        "intended_at": iso_utc(followed.intended_wall_ns),
        "sent_at": iso_utc(followed.sent_wall_ns),
        "verdict": verdict,
        "failed_hop": failed_hop,
        "hops": hops,
    }


class TraceLog(RunEvents):
    """Appends the line of each retired signal to a file: a sink of the run's events.

    The file is opened by :meth:`open` when the run starts emitting, so a start that fails
    leaves the previous run's log as it was. An I/O error (a full disk) stops the log, is
    logged once and kept in :attr:`error`; it never stops the run.
    """

    def __init__(self, path: str | Path, chains: Sequence[ChainSpec], run_id: str) -> None:
        self.path = Path(path)
        self._chains = tuple(chains)
        self._run_id = run_id
        self._file: IO[str] | None = None
        self.written = 0
        self.error: str | None = None

    def open(self) -> None:
        """Start the file anew."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8", buffering=1 << 16)
        except OSError as error:
            self._failed(error)

    def close(self) -> None:
        """Flush and close the file (what is buffered is written now)."""
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.close()
        except OSError as error:
            self._failed(error)

    def __enter__(self) -> TraceLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def retired(self, followed: FollowedSignal) -> None:
        """Append the line of a retired signal."""
        if self._file is None:
            return  # not open yet (nothing was emitted), or stopped by an error
        line = trace_line(followed, self._chains[followed.chain_index], self._run_id)
        try:
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        except OSError as error:
            self._failed(error)
            return
        self.written += 1

    def _failed(self, error: OSError) -> None:
        if self.error is None:
            self.error = error.strerror or str(error)
            log.error("trace log %s: %s; no more lines are written", self.path, self.error)
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):  # its buffer cannot be written either
                file.close()
