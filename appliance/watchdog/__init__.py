"""Device watchdog: telemetry sources, the load governor and the polling service.

Nothing here imports aiohttp or (at module level) jtop; see docs/WATCHDOG.md.
"""

from appliance.watchdog.governor import (
    EFFECTS,
    STATE_VALUES,
    Effects,
    Governor,
    State,
    Thresholds,
    Transition,
)
from appliance.watchdog.service import Watchdog
from appliance.watchdog.telemetry import (
    JtopSource,
    SysfsSource,
    Telemetry,
    TelemetryError,
    TelemetrySource,
    choose_source,
)

__all__ = [
    "EFFECTS",
    "STATE_VALUES",
    "Effects",
    "Governor",
    "JtopSource",
    "State",
    "SysfsSource",
    "Telemetry",
    "TelemetryError",
    "TelemetrySource",
    "Thresholds",
    "Transition",
    "Watchdog",
    "choose_source",
]
