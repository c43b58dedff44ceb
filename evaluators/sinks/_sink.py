"""The sink interface every result writer implements, its statistics, the null sink, and `open_sink`."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, runtime_checkable

from evaluators.sinks._lineprotocol import Point, to_lines

if TYPE_CHECKING:
    from evaluators.sinks._config import SinksConfig


@dataclass(frozen=True)
class SinkStats:
    """What a sink did with the points it was given.

    After a complete flush: written + adopted == sent + replayed + failed + pending.
    """

    written: int = 0
    """Points accepted by `write()` (for InfluxSink: durable in the spool)."""
    sent: int = 0
    """Points the server acknowledged straight away."""
    spooled: int = 0
    """Points that had to wait in the spool (the server did not acknowledge them, they were written
    during an outage, or an earlier run left them)."""
    replayed: int = 0
    """Spooled points acknowledged later."""
    failed: int = 0
    """Points the server refused as invalid (kept in the spool's rejected.lp)."""
    pending: int = 0
    """Points not acknowledged yet."""
    adopted: int = 0
    """Points taken over from an earlier (crashed or closed) writer's spool."""
    last_error: str | None = None
    """The last problem, in words, or None."""


@runtime_checkable
class Sink(Protocol):
    """Where points go. `write` never waits on the network."""

    def write(self, points: Iterable[Point]) -> None:
        """Take points. Raises PointError for a bad point before taking any of them."""

    def flush(self, timeout: float | None = None) -> bool:
        """Try to deliver everything written so far; True when all of it is acknowledged."""

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (within `timeout`) and release resources; undelivered points stay durable."""

    @property
    def stats(self) -> SinkStats:
        """Counts so far."""


class NullSink:
    """The sink when no InfluxDB is configured: points are checked, counted and not kept (the
    ledger has every sample)."""

    def __init__(self) -> None:
        self._written = 0
        self._lock = threading.Lock()

    def write(self, points: Iterable[Point]) -> None:
        """Validate and count points.

        Args:
            points: the points.
        """
        n = len(to_lines(points))
        with self._lock:
            self._written += n

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing to deliver."""
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Nothing to release."""

    @property
    def stats(self) -> SinkStats:
        return SinkStats(written=self._written)

    def __repr__(self) -> str:
        return "NullSink()"


def open_sink(sinks: "SinksConfig") -> "Sink":
    """The sink the config asks for: an `InfluxSink` when sinks.influx.url is set, else a `NullSink`.

    Args:
        sinks: the `sinks` section (paths absolute, as load_config makes them).
    """
    if not sinks.influx.enabled:
        return NullSink()
    from evaluators.sinks._influx import InfluxSink

    return InfluxSink.from_config(sinks)
