"""The judge's disk cache (sqlite) and request counters."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from imtune.errors import ImtuneError

# Bumped when the cached value's meaning changes, so old entries stop matching instead of being misread.
CACHE_SCHEMA = 2


def default_cache_path() -> Path:
    """$IMTUNE_CACHE/judge_cache.sqlite3, else ~/.cache/imtune/ (the same root as imtune's model cache)."""
    from imtune.gguf import cache_root

    return cache_root() / "judge_cache.sqlite3"


class JudgeCache:
    """sqlite key -> completion text; safe across threads (one connection behind a lock) and processes (WAL)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, model TEXT, "
                             "response TEXT NOT NULL, created REAL)")
            self._db.commit()
        except (OSError, sqlite3.Error) as e:
            raise ImtuneError(f"cannot open the judge cache {self.path}: {e} (use --judge-cache PATH or "
                              "--no-judge-cache)") from e
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM judgements WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, response: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?)",
                             (key, model, response, time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class JudgeStats:
    requests: int = 0       # HTTP attempts, retries included
    retries: int = 0
    cache_hits: int = 0
    completions: int = 0    # fresh completions received
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "retries": self.retries, "cache_hits": self.cache_hits,
                "completions": self.completions}
