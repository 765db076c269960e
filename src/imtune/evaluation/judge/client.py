"""A small client for any OpenAI-compatible `/v1/chat/completions` endpoint, used as an LLM judge.

Standard library only (urllib + a thread pool): the judge needs one POST shape, and staying off the `openai` SDK
keeps imtune installable on clusters where only the training stack is allowed, while still talking to OpenAI,
vLLM, llama.cpp's server, TGI or LiteLLM alike.

Every completion is cached on disk (sqlite, keyed by sha256 of judge model + messages + sampling parameters,
not the URL), so rerunning an evaluation, or resuming one that died halfway, re-asks only what is missing.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import random
import socket
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from imtune.errors import ImtuneError

API_KEY_ENVS = ("IMTUNE_JUDGE_API_KEY", "OPENAI_API_KEY")
KEY_MESSAGE = "judge rejected the API key (set IMTUNE_JUDGE_API_KEY)"
# Bumped when the cached value's meaning changes, so old entries stop matching instead of being misread.
CACHE_SCHEMA = 1

Message = dict  # {"role": ..., "content": ...}


def default_cache_path() -> Path:
    """$IMTUNE_CACHE/judge_cache.sqlite3, else ~/.cache/imtune/ (the same root as imtune's model cache)."""
    env = os.environ.get("IMTUNE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "imtune"
    return root / "judge_cache.sqlite3"


def api_key_from_env() -> str | None:
    for name in API_KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def chat_url(base_url: str) -> str:
    """`http://host:8000/v1` (or the full `.../chat/completions` URL) -> the chat-completions URL."""
    url = (base_url or "").strip()
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ImtuneError(f"judge base URL {base_url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Retryable(Exception):
    """A failure worth another try (429, 5xx, connection trouble, timeout); `kind` picks the final message."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


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


class JudgeClient:
    """Chat completions from an OpenAI-compatible server with retries, a concurrency cap and a disk cache.

    `api_key` defaults to $IMTUNE_JUDGE_API_KEY, then $OPENAI_API_KEY; local servers usually need none.
    `cache` is a path, a `JudgeCache`, None for the default location, or False for no cache.
    Back-off before retry k (0-based) is uniform in [d/2, d] with d = min(backoff_max, backoff_base * 2**k);
    a 429's Retry-After header, when present, is honoured (up to backoff_max).
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 1024, timeout: float = 120.0, max_retries: int = 6,
                 concurrency: int = 8, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 cache: str | os.PathLike | JudgeCache | bool | None = None, seed: int | None = None):
        if not model:
            raise ImtuneError("no judge model given (--judge-model)")
        if concurrency < 1:
            raise ImtuneError("judge concurrency must be >= 1")
        if max_retries < 0:
            raise ImtuneError("judge max retries must be >= 0")
        if timeout <= 0:
            raise ImtuneError("judge timeout must be > 0 seconds")
        self.base_url = base_url
        self.url = chat_url(base_url)
        self.model = model
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        if cache is False:
            self.cache = None
        elif isinstance(cache, JudgeCache):
            self.cache = cache
        else:
            self.cache = JudgeCache(cache if cache not in (None, True) else default_cache_path())
        self.stats = JudgeStats()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._stop = threading.Event()
        self._fatal: ImtuneError | None = None
        self._fatal_lock = threading.Lock()
        self._in_batch = False
        self._rng = random.Random(seed)
        host = urllib.parse.urlparse(self.url).hostname
        # A corporate HTTP(S)_PROXY must not swallow requests to a judge on this machine.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------------------------------------ keys

    def params(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def cache_key(self, messages: Sequence[Message]) -> str:
        blob = json.dumps({"schema": CACHE_SCHEMA, "model": self.model, "messages": list(messages),
                           "params": self.params()}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------------------------------------ calls

    def complete(self, messages: Sequence[Message]) -> str:
        """The judge's reply text for one conversation (cached)."""
        key = self.cache_key(messages)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.add(cache_hits=1)
                return hit
        try:
            text = self._request_with_retries(messages)
        except ImtuneError as e:
            # Stop sibling workers now, not when the main thread gets round to it: a bad key must not be
            # tried hundreds of times. The first error is the one worth reporting.
            if self._in_batch:
                with self._fatal_lock:
                    if self._fatal is None:
                        self._fatal = e
                self._stop.set()
            raise
        self.stats.add(completions=1)
        if self.cache is not None:
            self.cache.put(key, self.model, text)
        return text

    def complete_many(self, conversations: Sequence[Sequence[Message]], desc: str = "judging",
                      progress: bool | None = None) -> list[str]:
        """Replies in input order, at most `concurrency` requests in flight. The first fatal error (bad key,
        unreachable server, retries exhausted) stops the rest and is raised; finished replies stay cached."""
        n = len(conversations)
        if n == 0:
            return []
        self._stop.clear()
        self._fatal = None
        self._in_batch = True
        out: list[str | None] = [None] * n
        bar = _progress_bar(n, desc, progress)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, n), thread_name_prefix="imtune-judge")
        try:
            futures = {pool.submit(self.complete, conv): i for i, conv in enumerate(conversations)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    exc = f.exception()
                    if exc is not None:
                        self._stop.set()
                        for p in pending:
                            p.cancel()
                        raise self._fatal or exc
                    out[futures[f]] = f.result()
                    bar(1)
        finally:
            # On any exit (error, Ctrl-C) requests in flight finish, bounded by the timeout, but no new request
            # or back-off starts.
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._stop.clear()
            self._fatal = None
            self._in_batch = False
            bar(None)
        return out  # type: ignore[return-value]

    def _request_with_retries(self, messages: Sequence[Message]) -> str:
        body = json.dumps({"model": self.model, "messages": list(messages), **self.params()}).encode("utf-8")
        last: _Retryable | None = None
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise ImtuneError("judging stopped after an earlier error")
            if attempt:
                self.stats.add(retries=1)
                self._sleep(self._backoff(attempt - 1, last.retry_after if last else None))
            try:
                with self._slots:
                    self.stats.add(requests=1)
                    return self._post(body)
            except _Retryable as e:
                last = e
        assert last is not None
        tries = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        if last.kind == "timeout":
            raise ImtuneError(f"judge at {self.base_url} timed out after {tries} ({self.timeout:g} s each); "
                              "raise --judge-timeout or lower --judge-concurrency")
        if last.kind == "connect":
            raise ImtuneError(f"cannot reach judge at {self.base_url} ({last.detail}; {tries})")
        raise ImtuneError(f"judge at {self.base_url} kept failing: {last.detail} ({tries})")

    def _backoff(self, k: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.backoff_max)
        d = min(self.backoff_max, self.backoff_base * (2 ** k))
        return d / 2 + self._rng.uniform(0, d / 2)

    def _sleep(self, seconds: float) -> None:
        # Wakes early when another thread hit a fatal error, so Ctrl-C/401 don't wait out long back-offs.
        self._stop.wait(seconds)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "imtune-judge"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            self._raise_for_status(e)
            raise AssertionError("unreachable") from e
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, TimeoutError):
                raise _Retryable("timeout", "timed out") from e
            raise _Retryable("connect", _describe(reason)) from e
        except TimeoutError as e:
            raise _Retryable("timeout", "timed out") from e
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable("connect", _describe(e)) from e
        return self._parse_reply(raw)

    def _raise_for_status(self, e: urllib.error.HTTPError) -> None:
        code = e.code
        try:
            detail = _error_detail(e.read())
        except Exception:
            detail = ""
        if code in (401, 403):
            raise ImtuneError(KEY_MESSAGE + (f": {detail}" if detail else ""))
        if code == 429 or code == 408 or code >= 500:
            retry_after = None
            try:
                retry_after = float(e.headers.get("Retry-After")) if e.headers else None
            except (TypeError, ValueError):
                retry_after = None
            raise _Retryable("status", f"HTTP {code}" + (f" {detail}" if detail else ""), retry_after)
        hint = " (check --judge-base-url, usually ending in /v1, and --judge-model)" if code == 404 else ""
        raise ImtuneError(f"judge at {self.base_url} answered HTTP {code}"
                          + (f": {detail}" if detail else "") + hint)

    def _parse_reply(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            msg = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            snippet = raw[:120].decode("utf-8", "replace").replace("\n", " ")
            raise ImtuneError(f"judge at {self.base_url} did not answer in the chat-completions format "
                              f"(got {snippet!r})") from e
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _describe(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    s = str(reason) or type(reason).__name__
    return s.replace("\n", " ")[:200]


def _error_detail(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    return " ".join(str(text).split())[:200]


def _progress_bar(total: int, desc: str, enabled: bool | None) -> Callable[[int | None], None]:
    """update(k) advances, update(None) closes. Off unless stderr is a terminal (logs stay clean)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return lambda k: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    lock = threading.Lock()

    def update(k):
        with lock:
            if k is None:
                bar.close()
            else:
                bar.update(k)

    return update
