"""``traces.jsonl``: one line per followed signal, written when the signal is retired.

A :class:`TracePolicy` keeps the log to a size for long runs: every signal that is not ok
is written, ok ones by a share (chosen by a hash of the trace id, so a replay writes the
same lines); past ``max_bytes`` the file is rotated (``PATH`` becomes ``PATH.1``, and so
on up to ``keep``), always between two lines. A file moved away by someone else
(logrotate) is noticed within a second and opened anew at ``PATH``; one truncated in
place (logrotate's copytruncate) is written on from its new end.

Lines are gathered and written whole, at most a second or 64 KiB late; a write that fails
(a full disk) is cut back to the last whole line, its lines are counted ``lost``, and the
log stops, which never stops the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import PENDING, SKIPPED, FollowedSignal, Verdict
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


_CHECK_NS = 1_000_000_000  # how often lines are flushed and the file looked after
_BUFFER_BYTES = 1 << 16  # lines gathered before a write
OUTCOMES = ("written", "sampled_out", "lost")


@dataclass(frozen=True)
class TracePolicy:
    """How much of the trace log is kept: the share of ok signals written, the size at
    which the file rotates (None: never) and how many rotated files are kept."""

    sample_ok: float = 1.0
    max_bytes: int | None = None
    keep: int = 5


class TraceLog(RunEvents):
    """Appends the line of each retired signal to a file: a sink of the run's events.

    The file is opened by :meth:`open` when the run starts emitting, so a start that fails
    leaves the previous run's log as it was. An I/O error (a full disk) stops the log, is
    logged once and kept in :attr:`error`; it never stops the run.

    Attributes:
        written, sampled_out, lost: lines written; ok lines left out by ``sample_ok``;
            lines not written because of an I/O error (``fleetprobe_trace_lines_total``).
        rotations: how often the file was rotated.
    """

    def __init__(
        self,
        path: str | Path,
        chains: Sequence[ChainSpec],
        run_id: str,
        policy: TracePolicy = TracePolicy(),
        *,
        registry: CollectorRegistry | None = None,
        scenario: str = "",
    ) -> None:
        self.path = Path(path)
        self.policy = policy
        self._chains = tuple(chains)
        self._run_id = run_id
        self._fd: int | None = None
        self._bytes = 0  # whole lines in the current file
        self._pending: list[str] = []  # lines not written yet
        self._pending_bytes = 0
        self._checked_ns = 0
        self._ok_below = int(policy.sample_ok * 0xFFFFFFFF)  # crc32 of the trace id
        self.written = self.sampled_out = self.lost = self.rotations = 0
        self.error: str | None = None
        self._counters: dict[str, Counter] | None = None
        if registry is not None:
            counter = Counter(
                "fleetprobe_trace_lines",
                "Trace log lines of retired signals: written, ok ones sampled out, lost.",
                ["scenario", "outcome"],
                registry=registry,
            )
            self._counters = {o: counter.labels(scenario, o) for o in OUTCOMES}

    def open(self) -> None:
        """Start the file anew; with rotation, the rotated files of an earlier run go too
        (``PATH.<n>`` are then the log's own)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.policy.max_bytes is not None:
                for older in self.path.parent.glob(f"{self.path.name}.*"):
                    if older.suffix[1:].isdigit() and older.is_file():
                        older.unlink()
            self._open(truncate=True)
        except OSError as error:
            self._failed(error)

    def _open(self, *, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(self.path, flags, 0o644)
        self._bytes = os.fstat(self._fd).st_size
        self._checked_ns = time.monotonic_ns()

    def close(self) -> None:
        """Write what is gathered and close the file."""
        if self._fd is None:
            return
        self._flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> TraceLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def retired(self, followed: FollowedSignal) -> None:
        """Gather the line of a retired signal (an ok one as ``sample_ok`` says)."""
        if self._fd is None:
            if self.error is not None:
                self._count("lost")
            return  # not open yet (nothing was emitted), or stopped by an error
        if (
            followed.verdict is Verdict.OK
            and zlib.crc32(followed.trace_id.encode()) > self._ok_below
        ):
            self._count("sampled_out")
            return
        line = trace_line(followed, self._chains[followed.chain_index], self._run_id)
        text = json.dumps(line, separators=(",", ":")) + "\n"  # ASCII: a byte a character
        self._pending.append(text)
        self._pending_bytes += len(text)
        max_bytes = self.policy.max_bytes
        if (
            self._pending_bytes >= _BUFFER_BYTES
            or (max_bytes is not None and self._bytes + self._pending_bytes >= max_bytes)
            or time.monotonic_ns() - self._checked_ns >= _CHECK_NS
        ):
            self._flush()

    def _flush(self) -> None:
        """Write the gathered lines; then rotate, or follow a file moved or truncated."""
        if self._fd is None or not self._pending:
            return
        data = "".join(self._pending).encode()
        lines = len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        try:
            self._reopen_if_moved()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as error:
            if self._fd is not None:
                with contextlib.suppress(OSError):  # no half line left behind
                    os.ftruncate(self._fd, self._bytes)
            self._count("lost", lines)
            self._failed(error)
            return
        self._bytes += len(data)
        self._count("written", lines)
        max_bytes = self.policy.max_bytes
        try:
            if max_bytes is not None and self._bytes >= max_bytes:
                self._rotate()
        except OSError as error:
            self._failed(error)

    def _rotate(self) -> None:
        """PATH -> PATH.1 -> ... -> PATH.keep (the oldest goes), then PATH anew."""
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        for index in range(self.policy.keep - 1, 0, -1):
            older = self._rotated(index)
            if older.exists():
                older.replace(self._rotated(index + 1))
        if self.path.exists():
            self.path.replace(self._rotated(1))
        self.rotations += 1
        self._open(truncate=True)

    def _reopen_if_moved(self) -> None:
        """Follow logrotate: a file moved away is opened anew at PATH; one truncated in
        place is written on from its new end (O_APPEND does that; the count follows)."""
        assert self._fd is not None
        self._checked_ns = time.monotonic_ns()
        try:
            here = os.stat(self.path).st_ino
        except FileNotFoundError:
            here = None
        status = os.fstat(self._fd)
        if here != status.st_ino:
            os.close(self._fd)
            self._fd = None
            self._open(truncate=False)
        elif status.st_size < self._bytes:
            self._bytes = status.st_size

    def _rotated(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _count(self, outcome: str, lines: int = 1) -> None:
        if outcome == "written":
            self.written += lines
        elif outcome == "sampled_out":
            self.sampled_out += lines
        else:
            self.lost += lines
        if self._counters is not None:
            self._counters[outcome].inc(lines)

    def _failed(self, error: OSError) -> None:
        if self.error is None:
            self.error = error.strerror or str(error)
            log.error("trace log %s: %s; no more lines are written", self.path, self.error)
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
