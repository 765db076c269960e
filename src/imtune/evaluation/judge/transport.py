"""The judge client's transport pieces on top of urllib3: the retry policy bounded by an overall deadline, and
short, secret-free descriptions of what went wrong."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
)
from urllib3.util.retry import Retry

from imtune.evaluation.judge.redact import LogRedactor


def _is_retry_log(record: logging.LogRecord) -> bool:
    """urllib3's "Retrying ..." warnings for judge requests: the stats line reports retries instead."""
    return any(isinstance(a, JudgeRetry) for a in (record.args or ()))


for _name in ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry"):
    logging.getLogger(_name).addFilter(LogRedactor(drop=_is_retry_log))


class DeadlineReached(MaxRetryError):
    """The back-off ran into the request's deadline: no further attempt is started."""


class JudgeRetry(Retry):
    """urllib3's Retry, bounded by an overall deadline and stoppable by another thread's fatal error."""

    deadline = float("inf")
    stop: threading.Event | None = None
    attempts: list | None = None  # shared by the copies urllib3 makes, counts attempts for messages and stats

    def new(self, **kw):
        r = super().new(**kw)
        r.deadline, r.stop, r.attempts = self.deadline, self.stop, self.attempts
        return r

    def increment(self, *a, **kw):
        response = kw.get("response")
        self.attempts.append(getattr(response, "status", None))  # the status of each failed attempt, for messages
        new = super().increment(*a, **kw)  # raises when no retry is left: the caller then reads the reply
        if response is not None:
            # A reply that is retried is never read: urllib3 would drain it, however large or slow, before the
            # back-off; closing it (and handing the dead connection back to the pool) costs one reconnect instead.
            response.close()
            response.release_conn()
        return new

    def is_exhausted(self) -> bool:
        return (super().is_exhausted() or time.monotonic() >= self.deadline
                or (self.stop is not None and self.stop.is_set()))

    def sleep(self, response=None) -> None:
        wait_s = None
        if response is not None and self.respect_retry_after_header:
            try:
                wait_s = self.get_retry_after(response)
            except HTTPError:  # a malformed Retry-After: back off as usual
                wait_s = None
        wait_s = min(self.backoff_max, self.get_backoff_time() if wait_s is None else wait_s)
        wait_s = max(0.0, min(wait_s, self.deadline - time.monotonic()))
        if self.stop is not None:
            self.stop.wait(wait_s)  # wakes early when another thread hit a fatal error
        else:
            time.sleep(wait_s)
        if time.monotonic() >= self.deadline:  # an attempt started now could only be cut off
            raise DeadlineReached(None, "", "deadline")


def describe_error(reason) -> str:
    if isinstance(reason, NameResolutionError):
        return "unknown host"
    if isinstance(reason, NewConnectionError | ProtocolError):
        inner = reason.__context__ or reason.__cause__
        if isinstance(inner, ConnectionRefusedError) or "refused" in str(reason).lower():
            return "connection refused"
    # urllib3 messages name the connection object, never the URL's credentials; keep them short anyway.
    return " ".join(str(reason).split())[:200] or type(reason).__name__


def error_detail(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    return " ".join(str(text).split())[:200]


# ---- the deadline while a request waits for its reply's headers --------------------------------------------------
# urllib3's timeouts bound each socket read, not a request: a server that sends its status line and headers a byte
# at a time never trips them. While `request()` runs, a timer armed at the request's deadline shuts down the socket
# the reply is being read from (registered by the connection below, in the requesting thread).

_tls = threading.local()


class HeaderWatch:
    """Shuts down the socket of this thread's request at `deadline` (until `stop`)."""

    def __init__(self, deadline: float):
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._active, self.expired = True, False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> HeaderWatch:
        _tls.watch = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active = False
            self._timer.cancel()
        _tls.watch = None

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _fire(self) -> None:
        with self._lock:
            if self._active:
                self.expired = True
                self._shutdown()

    def watch(self, sock) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                self._shutdown()


class _Watched:
    def getresponse(self, *a, **kw):
        watch = getattr(_tls, "watch", None)
        if watch is not None:
            watch.watch(self.sock)
        return super().getresponse(*a, **kw)


class _HTTPConnection(_Watched, HTTPConnection):
    pass


class _HTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def watched(manager: urllib3.PoolManager) -> urllib3.PoolManager:
    """`manager` with connections whose reply wait a `HeaderWatch` can cut."""
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager
