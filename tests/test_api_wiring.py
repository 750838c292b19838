"""Issue 15's API wiring: the executor from the thread budget, the decoder's nvJPEG status in
/info, one recognizer submission per request, /draw_detections without recognizer work, and the
reduced-scale JPEG decode on the REST path. A real server on 127.0.0.1 with real ONNX models."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from appliance.api import state


async def test_executor_runs_as_many_jobs_at_once_as_the_thread_budget(serve: Any) -> None:
    # One more than the machine's cores: a pool sized to the cores (the old default) cannot
    # hold every party of the barrier at once and the barrier breaks.
    budget = (os.cpu_count() or 1) + 1
    client = await serve(cpu_threads=budget)
    executor = client.app[state.EXECUTOR]
    barrier = threading.Barrier(budget, timeout=10)
    loop = asyncio.get_running_loop()
    waits = [loop.run_in_executor(executor, barrier.wait) for _ in range(budget)]
    # Barrier.wait returns each party's distinct arrival index once all have arrived.
    assert sorted(await asyncio.gather(*waits)) == list(range(budget))
