"""The one redaction of secrets from whatever the judge path writes or prints.

A judge server can echo anything it received, the Authorization header included, and a reply is cached, written to
the annotations and shown in errors. So every judge reply passes through `redact` before it is cached or returned,
every error and urllib3 log line through it too, and the judge output files are written by `write_redacted`.
What counts as a secret: each client's credentials (API key, URL password, query string, basic-auth value), the
values of environment variables whose name says token/key/secret/password, the Hugging Face token, and anything
shaped like a bearer/basic credential or a well-known key format (`hf_…`, `sk-…`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.parse
from pathlib import Path

MASK = "***"
MIN_SECRET = 6  # shorter values (e.g. "1", "true") would mask ordinary words
_SECRET_ENV = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH", re.I)
_PATTERNS = (
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{12,}"), rf"\1{MASK}"),
    (re.compile(r"(?i)\b((?:api[_-]?key|token|secret|password)\"?\s*[:=]\s*\"?)[A-Za-z0-9._~+/=-]{6,}"), rf"\1{MASK}"),
    (re.compile(r"(?i)(authorization\"?\s*[:=]\s*\"?)[^\s\",}]+(?:\s+[^\s\",}]+)?"), rf"\1{MASK}"),
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "hf_" + MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "sk-" + MASK),
)

_registered: set[str] = set()
_lock = threading.Lock()


def register(*secrets: str | None) -> None:
    """Remember credentials a judge client holds, so every later `redact` masks them."""
    with _lock:
        _registered.update(s for s in secrets if s and len(s) >= MIN_SECRET)


def _hf_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no hub library, unreadable token file: nothing to mask
        return None


def known_secrets() -> list[str]:
    """Every secret value known now, longest first (so a secret containing another is masked whole)."""
    found = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= MIN_SECRET}
    found |= {t for t in (_hf_token(),) if t and len(t) >= MIN_SECRET}
    with _lock:
        found |= _registered
    # A value that also appears url-quoted (e.g. in a query string) is masked in both forms.
    found |= {urllib.parse.quote(v, safe="") for v in list(found)}
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every known secret and every credential-shaped string replaced by ***."""
    if not text:
        return text
    for s in secrets if secrets is not None else known_secrets():
        if s in text:
            text = text.replace(s, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_obj(obj, secrets: list[str] | None = None):
    """A JSON-like value with `redact` applied to every string in it (keys included)."""
    secrets = known_secrets() if secrets is None else secrets
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {redact_obj(k, secrets): redact_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v, secrets) for v in obj]
    return obj


def write_redacted(out_dir: str | Path, files: dict[str, tuple[str, object]]) -> dict[str, Path]:
    """The one writer of judge outputs: {label: (file name, JSON value or list of JSONL rows)}; a name ending in
    .jsonl is written a row per line. Every string is redacted first; each file is written atomically."""
    from imtune.io_utils import atomic_write_json, atomic_write_jsonl

    secrets = known_secrets()
    out, written = Path(out_dir), {}
    for label, (name, value) in files.items():
        clean = redact_obj(value, secrets)
        write = atomic_write_jsonl if name.endswith(".jsonl") else atomic_write_json
        written[label] = write(out / name, clean)
    return written


def redact_url(url: str) -> str:
    """`url` with any user:password and query string replaced by *** (for messages and logs)."""
    try:
        p = urllib.parse.urlsplit(str(url))
    except ValueError:
        return "<unparseable URL>"
    netloc = p.netloc.rpartition("@")[2]
    if "@" in p.netloc:
        netloc = MASK + "@" + netloc
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, MASK if p.query else "", ""))


class LogRedactor(logging.Filter):
    """Masks secrets in urllib3's log records (its debug log prints request paths with their query string);
    `drop` says which records to leave out entirely."""

    def __init__(self, drop=lambda record: False):
        super().__init__()
        self._drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        if self._drop(record):
            return False
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True
