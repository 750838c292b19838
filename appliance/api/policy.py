"""What the watchdog currently allows, published to the parts of the API that must obey it.

The watchdog decides; REST handlers and streams read `PolicyBoard.current` or subscribe to
changes. Keeping this small board between them means streams never import the watchdog.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    state: str = "ok"  # ok | warm | hot | critical | unknown
    fps_factor: float = 1.0  # multiply each stream's fps cap by this
    accept_new_streams: bool = True
    inference_paused: bool = False
    reason: str = ""


class PolicyBoard:
    def __init__(self) -> None:
        self.current = LoadPolicy()
        self._subscribers: list[Callable[[LoadPolicy], None]] = []

    def subscribe(self, callback: Callable[[LoadPolicy], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, policy: LoadPolicy) -> None:
        if policy == self.current:
            return
        self.current = policy
        for callback in list(self._subscribers):
            callback(policy)
