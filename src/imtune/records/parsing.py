"""Parse and validate data files (JSONL / JSON / CSV / Parquet) in any of four schemas, record by record.

Every problem is an `InputError` naming the file, the line (JSONL, and JSON/CSV where known) or record index, and
the reason. `detect_schema` and `normalise` also validate the rows of Hub datasets (records/sources.py).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from imtune.errors import InputError
from imtune.records.conversation import ROLES, Conversation, Message

SCHEMAS = ("messages", "sharegpt", "alpaca", "prompt_completion")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass
class LoadResult:
    records: list[Conversation]
    skipped: list[InputError] = field(default_factory=list)
    fingerprint: str | None = None  # of the data read (records.sources): changes when the data does


DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq")


def iter_conversations(path: Path, format: str | None, skip_invalid: bool, skipped: list):
    """Yield (where, Conversation) for each valid record of a data file, where = {'line': n} or {'record': i};
    bad records raise `InputError`, or with `skip_invalid` are appended to `skipped`."""
    try:
        for where, raw in _iter_raw(path, skip_invalid, skipped):
            try:
                yield where, _record(path, where, raw, format)
            except InputError as err:
                if not skip_invalid:
                    raise
                skipped.append(err)
    except OSError as e:  # e.g. permission denied, or a device that fails to read
        raise InputError(str(path), f"cannot read the file: {e.strerror or e}") from None


def check_data_file(path: Path) -> None:
    """Refuse what is not a readable regular file before opening it: a FIFO would block forever."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(str(path), "symlink loop (the link points, directly or not, back to itself)") from None
        if e.errno == errno.ENOENT and path.is_symlink():
            raise InputError(str(path), f"broken symlink (to {os.readlink(path)}, which does not exist)") from None
        if e.errno == errno.ENOENT:
            raise InputError(str(path), "file not found") from None
        raise InputError(str(path), f"cannot read the file: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(str(path), "is a directory, expected a data file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) \
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file"
        raise InputError(str(path), f"is {kind}, not a regular file")


def _record(path: Path, where: dict, raw, format: str | None) -> Conversation:
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        _check_parsed(raw)
        schema = format or detect_schema(raw)
        rid = where.get("record", where.get("line"))
        conv = normalise(raw, schema, id_default=str(rid))
    except ValueError as e:
        raise InputError(str(path), str(e), **where) from None
    return Conversation(conv.messages, conv.id, source=_where_str(path, where))


class _JSONObject(dict):
    """A parsed JSON object that remembers keys it saw twice (plain json keeps the last one silently)."""
    __slots__ = ("duplicates",)


def _object_pairs(pairs) -> _JSONObject:
    obj = _JSONObject()
    obj.duplicates = []
    for k, v in pairs:
        if k in obj:
            obj.duplicates.append(k)
        obj[k] = v
    return obj


class _HugeInt:
    """An integer literal too long for int() (Python refuses > 4300 digits): reported with its record."""
    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(s: str):
    limit = sys.get_int_max_str_digits()
    return _HugeInt(len(s)) if limit and len(s) > limit else int(s)


def _check_parsed(raw) -> None:
    stack = [raw]  # iterative: a record may legally nest deeper than Python's recursion limit allows
    while stack:
        node = stack.pop()
        if isinstance(node, _HugeInt):
            raise ValueError(f"integer with {node.digits} digits (more than Python reads: {sys.get_int_max_str_digits()})")
        if isinstance(node, dict):
            if getattr(node, "duplicates", None):
                raise ValueError(f"duplicate key {node.duplicates[0]!r} in a JSON object (which value is meant?)")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _parse_json(text: str):
    """json.loads with imtune's checks; every failure is a ValueError with a one-line reason."""
    try:
        return json.loads(text, object_pairs_hook=_object_pairs, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(_json_reason(e)) from None


def _json_reason(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    return f"unreadable JSON value: {str(e).split(';')[0]}"  # e.g. an integer of more than 4300 digits


def _where_str(path: Path, where: dict) -> str:
    return f"{path}:{where['line']}" if "line" in where else f"{path}: record {where['record']}"


def detect_schema(raw: dict) -> str:
    """Per record, by its distinctive key (so a record missing its second field still gets a precise reason)."""
    if "messages" in raw:
        return "messages"
    if "conversations" in raw:
        return "sharegpt"
    if "instruction" in raw:
        return "alpaca"
    if "prompt" in raw:
        return "prompt_completion"
    raise ValueError(
        "cannot tell the schema: expected 'messages', 'conversations', 'instruction'+'output' or "
        f"'prompt'+'completion' fields, found {sorted(raw)[:8]}"
    )


def _text(raw: dict, key: str, required: bool = True) -> str:
    if key not in raw or raw[key] is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    v = raw[key]
    if not isinstance(v, str):
        raise ValueError(f"field '{key}' must be a string, got {type(v).__name__}")
    return v


def _turns(raw: dict, field: str, role_key: str, text_key: str, word: str) -> list[dict]:
    """The list of turns under `field`, each a dict with `role_key` and `text_key` (else ValueError naming it)."""
    turns = raw.get(field)
    if not isinstance(turns, list):
        raise ValueError(f"missing field '{field}' (a list of {{{role_key}, {text_key}}})")
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise ValueError(f"{word} {i}: expected {{{role_key}, {text_key}}}")
    return turns


def normalise(raw: dict, schema: str, id_default: str = "") -> Conversation:
    """Turn one raw record into a validated `Conversation` (raises ValueError with the reason)."""
    if schema == "messages":
        messages = [_message(m["role"], m["content"], i, ROLES, weight=m.get("weight"))
                    for i, m in enumerate(_turns(raw, "messages", "role", "content", "message"))]
    elif schema == "sharegpt":
        messages = []
        for i, m in enumerate(_turns(raw, "conversations", "from", "value", "turn")):
            role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
            if role is None:
                raise ValueError(f"turn {i}: unknown role {m['from']!r} (expected human, gpt or system)")
            messages.append(_message(role, m["value"], i, ROLES, weight=m.get("weight")))
    elif schema == "alpaca":
        instruction, inp, output = _text(raw, "instruction"), _text(raw, "input", False), _text(raw, "output")
        prompt = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        messages = [_message("user", prompt, 0, ROLES, "instruction"), _message("assistant", output, 1, ROLES, "output")]
        if raw.get("system"):
            messages.insert(0, _message("system", _text(raw, "system"), 0, ROLES, "system"))
    elif schema == "prompt_completion":
        messages = [_message("user", _text(raw, "prompt"), 0, ROLES, "prompt"),
                    _message("assistant", _text(raw, "completion"), 1, ROLES, "completion")]
    else:  # pragma: no cover - guarded by load_dataset
        raise ValueError(f"unknown schema {schema}")
    if not any(m.role == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn")
    rid = raw.get("id", id_default)
    return Conversation(tuple(messages), id=str(rid))


def _message(role, content, i: int, allowed, field_name: str | None = None, weight=None) -> Message:
    label = f"field '{field_name}'" if field_name else f"message {i}"
    if role not in allowed:
        raise ValueError(f"{label}: unknown role {role!r} (expected one of {', '.join(allowed)})")
    if not isinstance(content, str):
        raise ValueError(f"{label}: content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise ValueError(f"{label}: empty content")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800" from a JSON escape: not text at all
        raise ValueError(f"{label}: content has a lone surrogate {content[e.start]!r} at character {e.start} "
                         f"(not valid Unicode)") from None
    return Message(role, content, _weight(weight, label))


def _weight(w, label: str) -> float | None:
    """A message's `weight`: a finite number >= 0 (OpenAI's fine-tuning format uses 0/1), None when absent/null."""
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise ValueError(f"{label}: weight must be a number >= 0, got {type(w).__name__} {w!r}"[:200])
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{label}: weight must be a finite number >= 0, got {w!r}")
    return w


def _decode(path: Path, data: bytes, line_of_offset: bool = True) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(str(path), f"not valid UTF-8 (byte {e.start})", line=line) from None


def _iter_raw(path: Path, skip_invalid: bool, skipped: list):
    """Yield (where, raw_record) with where = {'line': n} or {'record': i}."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            for n, bline in enumerate(f, 1):
                if not bline.strip():
                    continue
                try:
                    try:
                        line = bline.decode("utf-8-sig" if n == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"not valid UTF-8 (byte {e.start} of the line)") from None
                    raw = _parse_json(line)
                except ValueError as e:
                    err = InputError(str(path), str(e), line=n)
                    if not skip_invalid:
                        raise err from None
                    skipped.append(err)
                    continue
                yield {"line": n}, raw
    elif suffix == ".json":
        text = _decode(path, path.read_bytes())
        try:
            data = json.loads(text, object_pairs_hook=_object_pairs, parse_int=_parse_int)
        except json.JSONDecodeError as e:
            raise InputError(str(path), f"malformed JSON: {e.msg} at column {e.colno}", line=e.lineno) from None
        except (ValueError, RecursionError) as e:
            raise InputError(str(path), _json_reason(e)) from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None) if "messages" not in data else [data]
        if not isinstance(data, list):
            raise InputError(str(path), "expected a JSON array of records")
        for i, raw in enumerate(data):
            yield {"record": i}, raw
    elif suffix == ".csv":
        for i, row in enumerate(_csv_rows(path)):
            yield {"record": i}, {k: v for k, v in row.items() if k is not None}
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise InputError(str(path), f"cannot read Parquet: {e}") from None
        for i, raw in enumerate(table.to_pylist()):
            yield {"record": i}, raw
    else:
        raise InputError(str(path), f"unsupported file type '{suffix}' (expected .jsonl, .json, .csv or .parquet)")


def _csv_rows(path: Path) -> list[dict]:
    text = _decode(path, path.read_bytes())
    # csv's default field limit (131,072 characters) is no property of the data: a long response is fine. No field
    # can be longer than the file, so that is the limit while this file is read.
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, len(text) + 1))
    rows: list[dict] = []
    try:
        for row in csv.DictReader(io.StringIO(text, newline="")):
            rows.append(row)
    except csv.Error as e:
        raise InputError(str(path), f"malformed CSV: {e}", record=len(rows)) from None
    finally:
        csv.field_size_limit(old)
    return rows
