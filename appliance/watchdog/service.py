"""The watchdog task: read telemetry every WATCHDOG_INTERVAL_S, feed the governor, tell others.

`Watchdog` owns its source (it closes it on `stop`). Reads block (jtop's socket, sysfs files),
so each runs in a worker thread; a read that raises, or does not return within
`read_timeout_s`, counts as a failure and never ends the loop. Nothing here imports aiohttp:
the API subscribes to transitions and reads `state`, `effects`, `snapshot` and `health()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from appliance.watchdog.governor import STATE_VALUES, Effects, Governor, State, Transition
from appliance.watchdog.telemetry import (
    Telemetry,
    TelemetryError,
    TelemetrySource,
    choose_source,
)

if TYPE_CHECKING:
    from appliance.config import Settings

log = structlog.get_logger(__name__)

TransitionCallback = Callable[[Transition], None]


class Watchdog:
    def __init__(
        self,
        settings: Settings,
        source: TelemetrySource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.governor = Governor.from_settings(settings)
        self._source = source
        self.source_reason = "source given by the caller" if source is not None else "not started"
        self._clock = clock
        self.snapshot: Telemetry | None = None
        self.last_read_at: float | None = None
        # A hung read (a wedged jtop socket) must not stall the loop; a thread cannot be
        # cancelled, so the loop stops waiting after this long and counts a failure.
        self.read_timeout_s = max(5.0, 2 * settings.watchdog_interval_s)
        self._inflight: asyncio.Future[Telemetry] | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribers: list[TransitionCallback] = []

    # ----------------------------------------------------------------- read-only view

    @property
    def state(self) -> State:
        return self.governor.state

    @property
    def state_value(self) -> int:
        """The state as a gauge value: ok 0, warm 1, hot 2, critical 3, unknown -1."""
        return STATE_VALUES[self.governor.state]

    @property
    def effects(self) -> Effects:
        return self.governor.effects

    @property
    def last_error(self) -> str | None:
        return self.governor.last_error

    @property
    def last_transition(self) -> Transition | None:
        return self.governor.last_transition

    @property
    def source_name(self) -> str:
        return self._source.name if self._source is not None else "none"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def health(self) -> dict[str, Any]:
        """JSON-ready state for /health and /info."""
        last = self.governor.last_transition
        return {
            "state": self.state,
            "state_value": self.state_value,
            "effects": self.effects.as_dict(),
            "source": self.source_name,
            "reason": self.source_reason,
            "readings": self.snapshot.as_dict() if self.snapshot is not None else None,
            "last_read_at": self.last_read_at,
            "last_transition": last.as_dict() if last is not None else None,
            "error": self.governor.last_error,
            "consecutive_failures": self.governor.consecutive_failures,
        }

    # ----------------------------------------------------------------- subscribers

    def subscribe(self, callback: TransitionCallback) -> Callable[[], None]:
        """Call `callback(transition)` on every state change; returns an unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Pick the source (if none was given), take a first reading, then poll in a task.

        The first reading is taken before returning so readiness is known at start-up.
        TELEMETRY_SOURCE=jtop with no service raises TelemetryError here: fail fast at boot.
        """
        if self._task is not None:
            raise RuntimeError("watchdog already started")
        if self._source is None:
            # Connecting to jtop blocks on its socket.
            source, self.source_reason = await asyncio.to_thread(choose_source, self.settings)
            self._source = source
            log.info("telemetry_source_chosen", source=source.name, reason=self.source_reason)
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="watchdog")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        inflight, self._inflight = self._inflight, None
        if inflight is not None and not inflight.done():
            # The thread finishes on its own; only our wait for it is dropped.
            inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await inflight
        source, self._source = self._source, None
        if source is not None:
            await asyncio.to_thread(source.close)

    async def _run(self) -> None:
        interval = self.settings.watchdog_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a subscriber or the governor must not stop the watchdog
                log.exception("watchdog_poll_failed")

    # ----------------------------------------------------------------- one tick

    async def poll_once(self) -> Transition | None:
        """Read once, update the governor, notify subscribers; returns the transition, if any."""
        if self._source is None:
            raise RuntimeError("watchdog has no telemetry source (call start() first)")
        reading = await self._read()
        now = self._clock()
        was_failing = self.governor.consecutive_failures
        if isinstance(reading, Telemetry):
            self.snapshot = reading
            self.last_read_at = now
            if was_failing:
                log.info("telemetry_recovered", source=self.source_name, failures=was_failing)
        elif was_failing == 0:
            # Logged once per run of failures; the `unknown` transition is logged too.
            log.warning("telemetry_read_failed", source=self.source_name, error=str(reading))
        transition = self.governor.update(reading, now)
        if transition is not None:
            self._announce(transition)
        return transition

    async def _read(self) -> Telemetry | BaseException:
        assert self._source is not None
        stale = self._inflight
        if stale is not None:
            if not stale.done():
                # Never stack blocked threads: one hung read at a time.
                return TelemetryError("previous telemetry read still running")
            if not stale.cancelled():
                # A read that outlived its timeout: its value is old, read afresh instead.
                # Fetching the exception keeps asyncio from warning that it was never retrieved.
                stale.exception()
        self._inflight = asyncio.ensure_future(asyncio.to_thread(self._source.read))
        done, _ = await asyncio.wait({self._inflight}, timeout=self.read_timeout_s)
        if not done:
            return TelemetryError(f"telemetry read took more than {self.read_timeout_s:.1f} s")
        future, self._inflight = self._inflight, None
        exc = future.exception()
        return exc if exc is not None else future.result()

    def _announce(self, transition: Transition) -> None:
        snap = transition.snapshot
        readings: dict[str, Any] = {}
        if snap is not None:
            readings = {
                "max_temp_c": snap.max_temp_c,
                "hottest_zone": snap.hottest_zone,
                "ram_pct": round(snap.ram_pct, 2),
                "ram_used_bytes": snap.ram_used_bytes,
                "ram_total_bytes": snap.ram_total_bytes,
                "swap_used_bytes": snap.swap_used_bytes,
                "gpu_load_pct": snap.gpu_load_pct,
                "power_mw": snap.power_mw,
            }
        log.warning(
            "governor_state_changed",
            from_state=transition.from_state,
            to_state=transition.to_state,
            reason=transition.reason,
            source=self.source_name,
            error=transition.error,
            **readings,
        )
        for callback in list(self._subscribers):
            try:
                callback(transition)
            except Exception:
                log.exception("watchdog_subscriber_failed", to_state=transition.to_state)


__all__ = ["TransitionCallback", "Watchdog"]
