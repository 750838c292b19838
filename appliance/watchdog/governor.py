"""Telemetry -> load state, with hysteresis and a minimum dwell time (DESIGN section 5).

Pure logic: no I/O and no clock of its own; `Governor.update(reading, now)` is given each
snapshot (or the error a read raised) and the time, and returns the `Transition` it made, if any.

Rules:
- The raw level of a snapshot is the worst state whose threshold any value reaches: the hottest
  thermal zone against TEMP_*_C, used RAM in percent against RAM_*_PCT.
- Going UP (to a worse state) is immediate: heat and memory pressure must be acted on at once.
- Going DOWN needs every value to sit below the current state's threshold minus its margin
  (TEMP_HYSTERESIS_C, RAM_HYSTERESIS_PCT), continuously for WATCHDOG_MIN_DWELL_S; then the state
  drops ONE level, and the next level down needs its own full dwell. Stepping one level at a
  time brings load back gradually after a critical episode instead of all at once.
- `unknown`: TELEMETRY_FAIL_LIMIT failed reads in a row. Until the limit, the last state is
  kept (one bad read says nothing about the device). While unknown the appliance behaves like
  `warm` (cautious but serving) and reports it; the first good read goes straight to that
  reading's raw level, since there is no trustworthy previous state to hold on to.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from appliance.watchdog.telemetry import Telemetry

if TYPE_CHECKING:
    from appliance.config import Settings

State = Literal["ok", "warm", "hot", "critical", "unknown"]

# Severity order of the measured states; index = level.
LEVELS: tuple[State, ...] = ("ok", "warm", "hot", "critical")
# Numbers for a Prometheus gauge: severity order, unknown apart as -1 so alerts on ">= 2" never
# fire on a broken sensor (that has its own alert: "== -1").
STATE_VALUES: dict[State, int] = {"ok": 0, "warm": 1, "hot": 2, "critical": 3, "unknown": -1}


@dataclasses.dataclass(frozen=True)
class Effects:
    """What a state asks of the rest of the appliance; the API applies it."""

    # Multiply each stream's fps cap by this (0: no frames processed).
    fps_factor: float
    # False: new streams are refused with close code 1013.
    accept_new_streams: bool
    # True: REST answers 503 + Retry-After, streams are closed with 1013.
    inference_paused: bool
    # Multiply the REST batch window by this: fewer, fuller batches use the GPU more efficiently
    # per image when it must work less.
    batch_window_factor: float
    # /health/ready answers this.
    ready: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EFFECTS: dict[State, Effects] = {
    "ok": Effects(1.0, True, False, 1.0, True),
    "warm": Effects(0.5, True, False, 1.0, True),
    "hot": Effects(0.25, False, False, 4.0, True),
    "critical": Effects(0.0, False, True, 4.0, False),
    # No data: cautious but serving, like warm.
    "unknown": Effects(0.5, True, False, 1.0, True),
}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """(warm, hot, critical) limits and the margins a value must fall below them to release."""

    temp_c: tuple[float, float, float] = (80.0, 90.0, 97.0)
    ram_pct: tuple[float, float, float] = (80.0, 90.0, 95.0)
    temp_margin_c: float = 3.0
    ram_margin_pct: float = 3.0

    def __post_init__(self) -> None:
        for name in ("temp_c", "ram_pct"):
            values = getattr(self, name)
            if not (len(values) == 3 and values[0] < values[1] < values[2]):
                raise ValueError(f"{name} must be three increasing values, got {values}")
        if self.temp_margin_c < 0 or self.ram_margin_pct < 0:
            raise ValueError("margins must be >= 0")

    @classmethod
    def from_settings(cls, s: Settings) -> Thresholds:
        return cls(
            temp_c=(s.temp_warm_c, s.temp_hot_c, s.temp_critical_c),
            ram_pct=(s.ram_warm_pct, s.ram_hot_pct, s.ram_critical_pct),
            temp_margin_c=s.temp_hysteresis_c,
            ram_margin_pct=s.ram_hysteresis_pct,
        )


@dataclasses.dataclass(frozen=True)
class Transition:
    """One state change: when, from what to what, why, and the reading that caused it."""

    from_state: State
    to_state: State
    reason: str
    at: float
    snapshot: Telemetry | None
    error: str | None = None

    @property
    def effects(self) -> Effects:
        return EFFECTS[self.to_state]

    def as_dict(self) -> dict[str, Any]:
        return {
            "from_state": self.from_state,
            "to_state": self.to_state,
            "reason": self.reason,
            "at": self.at,
            "error": self.error,
        }


def raw_level(snapshot: Telemetry, th: Thresholds) -> tuple[State, str]:
    """The state a snapshot calls for on its own (no hysteresis), and which value set it."""
    temp, zone, ram = snapshot.max_temp_c, snapshot.hottest_zone, snapshot.ram_pct
    for idx in range(3, 0, -1):
        t_lim, r_lim = th.temp_c[idx - 1], th.ram_pct[idx - 1]
        if temp is not None and temp >= t_lim:
            return LEVELS[idx], f"{zone} {temp:.1f} C >= {t_lim:.1f} C"
        if snapshot.ram_total_bytes and ram >= r_lim:
            return LEVELS[idx], f"RAM {ram:.1f}% >= {r_lim:.1f}%"
    return "ok", "all values below the warm limits"


class Governor:
    """Holds the current state; `update` feeds it one reading (or read error) at a time."""

    def __init__(
        self,
        thresholds: Thresholds | None = None,
        min_dwell_s: float = 3.0,
        fail_limit: int = 3,
        initial: State = "ok",
    ) -> None:
        if min_dwell_s < 0 or fail_limit < 1:
            raise ValueError("min_dwell_s must be >= 0 and fail_limit >= 1")
        self.thresholds = thresholds or Thresholds()
        self.min_dwell_s = min_dwell_s
        self.fail_limit = fail_limit
        self.state: State = initial
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_transition: Transition | None = None
        # When every value first fell below the current state's release limit (None: not now).
        self._below_since: float | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> Governor:
        return cls(
            Thresholds.from_settings(s),
            min_dwell_s=s.watchdog_min_dwell_s,
            fail_limit=s.telemetry_fail_limit,
        )

    @property
    def effects(self) -> Effects:
        return EFFECTS[self.state]

    def update(self, reading: Telemetry | BaseException, now: float) -> Transition | None:
        if isinstance(reading, BaseException):
            return self._failed(reading, now)
        self.consecutive_failures = 0
        self.last_error = None
        return self._measured(reading, now)

    def _failed(self, error: BaseException, now: float) -> Transition | None:
        self.consecutive_failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        # No data is no evidence that the device cooled down.
        self._below_since = None
        if self.state == "unknown" or self.consecutive_failures < self.fail_limit:
            return None
        reason = f"telemetry failed {self.consecutive_failures} times in a row"
        return self._move("unknown", reason, now, None, self.last_error)

    def _measured(self, snapshot: Telemetry, now: float) -> Transition | None:
        th = self.thresholds
        target, why = raw_level(snapshot, th)
        if self.state == "unknown":
            self._below_since = None
            return self._move(target, f"telemetry back: {why}", now, snapshot)
        current = LEVELS.index(self.state)
        if LEVELS.index(target) > current:
            self._below_since = None
            return self._move(target, why, now, snapshot)
        if current == 0:
            return None
        # Still held if any value is within the margin of the current state's limit.
        t_lim = th.temp_c[current - 1] - th.temp_margin_c
        r_lim = th.ram_pct[current - 1] - th.ram_margin_pct
        temp = snapshot.max_temp_c
        held = (temp is not None and temp >= t_lim) or (
            snapshot.ram_total_bytes > 0 and snapshot.ram_pct >= r_lim
        )
        if held:
            self._below_since = None
            return None
        if self._below_since is None:
            self._below_since = now
        waited = now - self._below_since
        if waited < self.min_dwell_s:
            return None
        lower = LEVELS[current - 1]
        reason = (
            f"all values below {self.state} release ({t_lim:.1f} C, RAM {r_lim:.1f}%) "
            f"for {waited:.1f} s"
        )
        # The next level down needs its own full dwell, counted from now.
        self._below_since = now
        return self._move(lower, reason, now, snapshot)

    def _move(
        self,
        to_state: State,
        reason: str,
        now: float,
        snapshot: Telemetry | None,
        error: str | None = None,
    ) -> Transition | None:
        if to_state == self.state:
            return None
        transition = Transition(self.state, to_state, reason, now, snapshot, error)
        self.state = to_state
        self.last_transition = transition
        return transition


__all__ = [
    "EFFECTS",
    "LEVELS",
    "STATE_VALUES",
    "Effects",
    "Governor",
    "State",
    "Thresholds",
    "Transition",
    "raw_level",
]
