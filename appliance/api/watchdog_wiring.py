"""The watchdog inside the app: its state becomes the API's load policy, readiness and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.api import state
from appliance.api.errors import StartupError
from appliance.api.policy import LoadPolicy
from appliance.watchdog import TelemetryError, Transition, Watchdog


class WatchdogCollector(Collector):
    """Reads the latest snapshot at scrape time, so the gauges never lag behind the watchdog."""

    def __init__(self, watchdog: Watchdog) -> None:
        self._watchdog = watchdog

    def collect(self) -> Iterator[GaugeMetricFamily]:
        wd = self._watchdog
        yield GaugeMetricFamily(
            "appliance_governor_state",
            "Governor state: ok 0, warm 1, hot 2, critical 3, unknown -1",
            value=wd.state_value,
        )
        yield GaugeMetricFamily(
            "appliance_telemetry_failures",
            "Failed telemetry reads in a row",
            value=wd.governor.consecutive_failures,
        )
        snap = wd.snapshot
        if snap is None:
            return
        temps = GaugeMetricFamily(
            "appliance_temperature_celsius", "Thermal zone temperature", labels=["zone"]
        )
        for zone, value in sorted(snap.temperatures_c.items()):
            temps.add_metric([zone], value)
        yield temps
        memory = GaugeMetricFamily(
            "appliance_memory_bytes", "System memory (shared by CPU and GPU)", labels=["kind"]
        )
        memory.add_metric(["ram_used"], snap.ram_used_bytes)
        memory.add_metric(["ram_total"], snap.ram_total_bytes)
        memory.add_metric(["swap_used"], snap.swap_used_bytes)
        memory.add_metric(["swap_total"], snap.swap_total_bytes)
        yield memory
        if snap.gpu_load_pct is not None:
            yield GaugeMetricFamily(
                "appliance_gpu_load_percent", "GPU load", value=snap.gpu_load_pct
            )
        if snap.power_mw is not None:
            yield GaugeMetricFamily(
                "appliance_power_milliwatts", "Total board power", value=snap.power_mw
            )


async def watchdog_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[state.SETTINGS]
    watchdog = Watchdog(settings)
    board = app[state.POLICY]
    analyzer = app[state.ANALYZER]
    batchers = [analyzer.detector.batcher] + (
        [analyzer.recognizer.batcher] if analyzer.recognizer else []
    )
    base_window_s = settings.batch_window_ms / 1000.0

    def apply(transition: Transition | None) -> None:
        effects = watchdog.effects
        for batcher in batchers:
            batcher.window_s = base_window_s * effects.batch_window_factor
        board.publish(
            LoadPolicy(
                state=watchdog.state,
                fps_factor=effects.fps_factor,
                accept_new_streams=effects.accept_new_streams,
                inference_paused=effects.inference_paused,
                reason=transition.reason if transition is not None else "",
            )
        )

    unsubscribe = watchdog.subscribe(apply)
    try:
        await watchdog.start()
    except TelemetryError as exc:
        raise StartupError(str(exc)) from None
    apply(watchdog.last_transition)
    app[state.WATCHDOG] = watchdog
    app[state.READINESS_CHECKS]["watchdog"] = lambda: {
        "ok": watchdog.effects.ready,
        **watchdog.health(),
    }
    app[state.INFO_PROVIDERS]["watchdog"] = watchdog.health
    collector = WatchdogCollector(watchdog)
    app[state.METRICS].registry.register(collector)
    yield
    app[state.METRICS].registry.unregister(collector)
    unsubscribe()
    await watchdog.stop()
