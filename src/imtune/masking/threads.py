"""A lazily created thread pool that a forked child re-creates instead of inheriting (it has none of the threads)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


class ForkSafePool:
    def __init__(self, max_workers: int, name: str):
        self.max_workers, self.name = max_workers, name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=self.name)
            return self._pool

    def _reset(self) -> None:
        self._pool, self._lock = None, threading.Lock()
