"""A client for any OpenAI-compatible `/v1/chat/completions` endpoint, used as an LLM judge.

HTTP, retries and back-off are urllib3's (a maintained client, already installed with transformers' requests):
`Retry` retries 408/429/5xx, connection errors and timeouts with exponential back-off and honours `Retry-After`.
imtune adds only what the judge needs on top of it:
  * an overall deadline per request: no retry or wait starts after it, and a `Retry-After` is capped at
    `backoff_max` and at the time left (a server asking for an hour does not stall the run);
  * redirects are never followed (a 3xx is an error), so the API key is never sent to another host;
  * secrets (the API key, `user:pass@` in the base URL, query strings, token-like environment values, the HF
    token) never reach the disk or the terminal: every reply, error and log line passes through `redact.redact`
    (a server may echo the Authorization header back), and the output files are written by `write_redacted`;
  * a reply body is streamed: one over `max_reply_bytes` is an error, and the overall deadline is checked while
    reading (a server dripping a byte a second cannot hold a request past it);
  * a reply counts only if it is in the chat-completions format, and is cached only when the caller's `parse`
    accepts it (a verdict): unparseable or empty replies are asked again on the next run;
  * at most `concurrency` requests in flight; a fatal error (bad key, unreachable judge) stops a batch at once.

Every accepted completion is cached on disk (sqlite, keyed by sha256 of the normalised judge URL + model +
messages + decoding settings), so a second judge is asked its own verdicts, and rerunning an evaluation, or resuming one that died halfway, re-asks only what is
missing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import urllib3
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    NewConnectionError,
)
from urllib3.exceptions import (
    TimeoutError as Urllib3Timeout,
)

from imtune.errors import ImtuneError
from imtune.evaluation.judge.cache import CACHE_SCHEMA, JudgeCache, JudgeStats, default_cache_path
from imtune.evaluation.judge.redact import known_secrets, redact, redact_url, register
from imtune.evaluation.judge.transport import (
    DeadlineReached,
    HeaderWatch,
    JudgeRetry,
    describe_error,
    error_detail,
    watched,
)

API_KEY_ENVS = ("IMTUNE_JUDGE_API_KEY", "OPENAI_API_KEY")
KEY_MESSAGE = "judge rejected the API key (set IMTUNE_JUDGE_API_KEY)"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_REPLY_BYTES = 8 * 1024 * 1024  # a chat completion is kilobytes; more is a broken or hostile server
CHUNK = 64 * 1024

Message = dict  # {"role": ..., "content": ...}


def api_key_from_env() -> str | None:
    for name in API_KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def chat_url(base_url: str) -> str:
    """`http://host:8000/v1` (or the full `.../chat/completions` URL) -> the chat-completions URL."""
    url = (base_url or "").strip()
    try:
        parsed = urllib.parse.urlsplit(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname)
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise ImtuneError(f"judge base URL {redact_url(base_url)!r} is not an http(s) URL "
                          "(e.g. http://localhost:8000/v1)")
    path = parsed.path.rstrip("/")
    path = path if path.endswith("/chat/completions") else path + "/chat/completions"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, parsed.query, ""))


def normalise_url(url: str) -> str:
    """The judge's identity in the cache: scheme and host lower-cased, the default port made explicit, no
    credentials, the path without a trailing slash (the query stays: it can select a deployment)."""
    p = urllib.parse.urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme.lower())
    host = (p.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((p.scheme.lower(), f"{host}:{port}", p.path.rstrip("/") or "/", p.query, ""))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JudgeClient:
    """Chat completions from an OpenAI-compatible server with retries, a concurrency cap and a disk cache.

    `api_key` defaults to $IMTUNE_JUDGE_API_KEY, then $OPENAI_API_KEY; local servers usually need none;
    `user:pass@` in `base_url` is sent as HTTP basic auth to that server only (when there is no key).
    `cache` is a path, a `JudgeCache`, None for the default location, or False for no cache.
    Back-off before retry k is urllib3's: min(backoff_max, backoff_base * 2**k) plus up to 10% jitter; a
    Retry-After header is honoured up to backoff_max. `timeout` bounds each attempt, `deadline` (default:
    10 minutes) the whole request, retries and waits included.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 1024, timeout: float = 120.0, max_retries: int = 6,
                 concurrency: int = 8, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 deadline: float = 600.0, cache: str | os.PathLike | JudgeCache | bool | None = None,
                 seed: int | None = None, max_reply_bytes: int = MAX_REPLY_BYTES):
        if not model:
            raise ImtuneError("no judge model given (--judge-model)")
        for ok, what in ((concurrency >= 1, "concurrency must be >= 1"), (max_retries >= 0, "max retries must "
                         "be >= 0"), (timeout > 0, "timeout must be > 0 seconds"),
                         (deadline > 0, "deadline must be > 0 seconds"),
                         (max_reply_bytes > 0, "reply size cap must be > 0 bytes")):
            if not ok:
                raise ImtuneError(f"judge {what}")
        self.url = chat_url(base_url)
        self.base_url = redact_url(base_url.strip())  # what messages show
        self.model = model
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout, self.deadline, self.max_retries = timeout, deadline, max_retries
        self.concurrency, self.backoff_base, self.backoff_max = concurrency, backoff_base, backoff_max
        self.seed, self.max_reply_bytes = seed, max_reply_bytes
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
        self._headers, self._http = self._connection()
        self._secret_values = known_secrets()  # once per client: the environment and token file are read here

    def _connection(self) -> tuple[dict, urllib3.PoolManager]:
        parts = urllib.parse.urlsplit(self.url)
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "imtune-judge"}
        register(self.api_key, parts.password, parts.query)
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif parts.username is not None:
            userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")
        if "Authorization" in headers:
            register(headers["Authorization"].partition(" ")[2], urllib.parse.unquote(parts.password or ""))
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        # A corporate HTTP(S)_PROXY is honoured for remote judges (as urllib did), never for this machine's.
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not _is_loopback(parts.hostname) and not urllib.request.proxy_bypass(parts.hostname or ""):
            return headers, watched(urllib3.ProxyManager(proxy, num_pools=2, maxsize=self.concurrency, block=True))
        return headers, watched(urllib3.PoolManager(num_pools=2, maxsize=self.concurrency, block=True))

    # ------------------------------------------------------------------------------------------------ keys

    def params(self) -> dict:
        """The decoding settings sent with every request (and part of the cache key)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens,
                **({"seed": self.seed} if self.seed is not None else {})}

    def cache_key(self, messages: Sequence[Message]) -> str:
        """sha256 of the judge (normalised URL, model), the conversation and the decoding settings: a verdict is
        reused only when the same judge was asked the same thing the same way."""
        blob = json.dumps({"schema": CACHE_SCHEMA, "url": normalise_url(self.url), "model": self.model,
                           "messages": list(messages), "params": self.params()}, sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------------------------------------ calls

    def complete(self, messages: Sequence[Message], parse: Callable[[str], object] | None = None) -> str:
        """The judge's reply text for one conversation. Served from and saved to the cache only when it is
        non-empty and `parse(reply)` (e.g. the verdict parser) is not None."""
        def usable(text: str | None) -> bool:
            return bool(text and text.strip()) and (parse is None or parse(text) is not None)

        key = self.cache_key(messages)
        if self.cache is not None:
            hit = self.cache.get(key)
            if usable(hit):
                self.stats.add(cache_hits=1)
                return hit
        try:
            text = redact(self._request(messages), self._secret_values)
        except ImtuneError as e:
            # Stop sibling workers now: a bad key must not be tried hundreds of times. The first error is the
            # one worth reporting.
            if self._in_batch:
                with self._fatal_lock:
                    self._fatal = self._fatal or e
                self._stop.set()
            raise
        self.stats.add(completions=1)
        if self.cache is not None and usable(text):
            self.cache.put(key, self.model, text)
        return text

    def complete_many(self, conversations: Sequence[Sequence[Message]], desc: str = "judging",
                      progress: bool | None = None, parse: Callable[[str], object] | None = None) -> list[str]:
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
            futures = {pool.submit(self.complete, conv, parse): i for i, conv in enumerate(conversations)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        self._stop.set()
                        raise self._fatal or f.exception()
                    out[futures[f]] = f.result()
                    bar(1)
        finally:
            # On any exit (error, Ctrl-C) requests in flight finish, bounded by the timeout, but no new request
            # or back-off starts.
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._stop.clear()
            self._fatal, self._in_batch = None, False
            bar(None)
        return out  # type: ignore[return-value]

    def _retry(self) -> JudgeRetry:
        r = JudgeRetry(total=self.max_retries, redirect=False, allowed_methods=None,
                        status_forcelist=RETRY_STATUSES, backoff_factor=self.backoff_base,
                        backoff_max=self.backoff_max, backoff_jitter=0.1 * self.backoff_base,
                        raise_on_status=False, respect_retry_after_header=True)
        r.deadline, r.stop, r.attempts = time.monotonic() + self.deadline, self._stop, []
        return r

    def _request(self, messages: Sequence[Message]) -> str:
        if self._stop.is_set():
            raise ImtuneError("judging stopped after an earlier error")
        body = json.dumps({"model": self.model, "messages": list(messages), **self.params()}).encode("utf-8")
        retry = self._retry()
        with self._slots:
            try:
                with HeaderWatch(retry.deadline) as watch:
                    resp = self._http.request("POST", self.url, body=body, headers=self._headers, retries=retry,
                                              redirect=False, preload_content=False,
                                              timeout=urllib3.Timeout(total=min(self.timeout, self.deadline)))
            except (HTTPError, OSError) as e:  # MaxRetryError: retries spent; else one urllib3 does not retry
                retried = isinstance(e, MaxRetryError)
                n = len(retry.attempts) + (0 if retried else 1)
                self._count(n)
                if watch.expired or isinstance(e, DeadlineReached):
                    # The deadline cut the back-off or an attempt: name what the earlier attempts got, if anything.
                    last = next((c for c in reversed(retry.attempts) if c is not None), None)
                    raise (self._late() if last is None else ImtuneError(
                        f"judge at {self.base_url} kept failing: HTTP {last} until the {self.deadline:g} s deadline "
                        f"({self._tries(n)})")) from None
                raise self._transport_error(e.reason if retried else e, n) from None
            attempts = len(retry.attempts) + (resp.status not in RETRY_STATUSES)
            self._count(attempts)
            ok = resp.status == 200
            # An error's body only explains the status: a second past the deadline to read its first bytes.
            read_until = retry.deadline if ok else max(retry.deadline, time.monotonic() + 1.0)
            try:
                raw = self._read_body(resp, read_until, self.max_reply_bytes if ok else CHUNK)
            finally:
                resp.release_conn()
        if resp.status != 200:
            raise self._status_error(resp, raw, attempts)
        return self._parse_reply(raw)

    def _read_body(self, resp, deadline: float, cap: int) -> bytes:
        """The body, read in chunks as they arrive, at most `cap` bytes (an error reply is cut there; a 200 over
        it is an error), and never past the request's deadline: a watchdog shuts the socket at the deadline, so a
        server dripping bytes, or gone silent mid-body, cannot hold the read open."""
        chunks, size = [], 0
        def cut() -> None:
            with contextlib.suppress(OSError):  # already closed: nothing left to cut
                resp.shutdown()

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            while size <= cap:
                try:
                    chunk = resp.read1(CHUNK)
                except (HTTPError, OSError) as e:
                    if time.monotonic() >= deadline:
                        break
                    raise self._transport_error(e, 1) from None
                if not chunk or time.monotonic() >= deadline:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            watchdog.cancel()
        if time.monotonic() >= deadline:
            resp.close()  # the connection is mid-body: never hand it back to the pool
            if resp.status != 200:
                return b"".join(chunks)[:cap]
            raise self._late()
        if size > cap:
            resp.close()
            if resp.status == 200:
                raise ImtuneError(f"judge at {self.base_url} sent a reply over {cap} bytes; refused (a chat "
                                  "completion is a few kilobytes: check --judge-base-url)")
        return b"".join(chunks)[:cap]

    def _late(self) -> ImtuneError:
        return ImtuneError(f"judge at {self.base_url} did not finish its reply within the {self.deadline:g} s "
                           "deadline (--judge-deadline)")

    def _count(self, attempts: int) -> None:
        self.stats.add(requests=attempts, retries=max(0, attempts - 1))

    def _tries(self, attempts: int) -> str:
        return f"{attempts} attempt{'s' if attempts != 1 else ''}"

    def _transport_error(self, reason, attempts: int) -> ImtuneError:
        if self._stop.is_set():
            return ImtuneError("judging stopped after an earlier error")
        if isinstance(reason, Urllib3Timeout | TimeoutError) and not isinstance(reason, NewConnectionError):
            return ImtuneError(f"judge at {self.base_url} timed out after {self._tries(attempts)} "
                               f"({self.timeout:g} s each); raise --judge-timeout or lower --judge-concurrency")
        return ImtuneError(f"cannot reach judge at {self.base_url} ({describe_error(reason)}; {self._tries(attempts)})")

    def _status_error(self, resp, raw: bytes, attempts: int) -> ImtuneError:
        code, detail = resp.status, redact(error_detail(raw))  # servers may echo what they rejected
        if code in (401, 403):
            return ImtuneError(KEY_MESSAGE + (f": {detail}" if detail else ""))
        if 300 <= code < 400:
            return ImtuneError(f"judge at {self.base_url} answered HTTP {code} (a redirect, to "
                               f"{redact_url(resp.headers.get('Location', '?'))}); redirects are not followed: "
                               "pass the final URL as --judge-base-url")
        if code in RETRY_STATUSES:
            return ImtuneError(f"judge at {self.base_url} kept failing: HTTP {code}"
                               + (f" {detail}" if detail else "") + f" ({self._tries(attempts)})")
        hint = " (check --judge-base-url, usually ending in /v1, and --judge-model)" if code == 404 else ""
        return ImtuneError(f"judge at {self.base_url} answered HTTP {code}" + (f": {detail}" if detail else "")
                           + hint)

    def _parse_reply(self, raw: bytes) -> str:
        try:
            msg = json.loads(raw)["choices"][0]["message"]
            content = msg.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = redact(raw[:120].decode("utf-8", "replace").replace("\n", " "))
            raise ImtuneError(f"judge at {self.base_url} did not answer in the chat-completions format "
                              f"(got {snippet!r})") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""

    def close(self) -> None:
        self._http.clear()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
