"""Exponential backoff with jitter, so many clients retrying at once spread out."""

from __future__ import annotations

import random


class Backoff:
    """Delays base, 2·base, 4·base … up to cap, each randomized to between half and all
    of its value; `reset()` after a success starts over."""

    def __init__(self, base: float = 0.2, cap: float = 10.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2.0 ** self.attempt)
        if delay < self.cap:  # stop growing: 2**attempt would overflow a float
            self.attempt += 1
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0
