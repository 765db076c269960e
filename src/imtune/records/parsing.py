"""Parse and validate data files (JSONL / JSON / CSV / Parquet) in any of four schemas, record by record.

Every problem is an `InputError` naming the file, the line (JSONL, and JSON/CSV where known) or record index, and
the reason. `detect_schema` and `normalise` also validate the rows of Hub datasets (records/sources.py).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from imtune.errors import InputError
from imtune.inputs import Source, check_parsed, check_regular, decode_utf8, loads_json
from imtune.ranges import LOSS_WEIGHT_TEXT, is_loss_weight
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


def iter_conversations(source: Source, format: str | None, skip_invalid: bool, skipped: list):
    """Yield (where, Conversation) for each valid record of a data file opened as `source` (read once, hashed as
    it is parsed, checked unchanged at the end), where = {'line': n} or {'record': i}; bad records raise
    `InputError`, or with `skip_invalid` are appended to `skipped`."""
    path = source.path
    try:
        for where, raw in _iter_raw(source, skip_invalid, skipped):
            try:
                yield where, _record(path, where, raw, format)
            except InputError as err:
                if not skip_invalid:
                    raise
                skipped.append(err)
    except OSError as e:  # e.g. a device that fails to read
        raise InputError(str(path), f"cannot read the file: {e.strerror or e}") from None
    source.check_unchanged()


def check_data_file(path: Path) -> None:
    """Refuse what is not a readable regular file before opening it: a FIFO would block forever."""
    check_regular(path, "data file")


def _record(path: Path, where: dict, raw, format: str | None) -> Conversation:
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        check_parsed(raw)
        schema = format or detect_schema(raw)
        rid = where.get("record", where.get("line"))
        conv = normalise(raw, schema, id_default=str(rid))
    except ValueError as e:
        raise InputError(str(path), str(e), **where) from None
    return Conversation(conv.messages, conv.id, source=_where_str(path, where))


def _parse_json(text: str):
    """json.loads with imtune's checks (inputs.loads_json); every failure is a ValueError with a one-line reason."""
    try:
        return loads_json(text, check=False)  # checked by _record, with the record's place
    except ValueError as e:
        raise ValueError(str(e)) from None  # without the JSON line number: the caller names the record


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
    w = raw.get("weight")
    if not (w is None or (isinstance(w, str) and not w.strip())):  # ignored, it would not change the loss as meant
        raise ValueError("a record-level 'weight' is not read: weights belong on messages (a messages or "
                         "conversations record); drop or rename the field to train on this record")
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
    try:
        w = float(w)
    except OverflowError:  # an integer past float's range
        w = math.inf
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{label}: weight must be a finite number >= 0, got {w!r}")
    if not is_loss_weight(w):
        raise ValueError(f"{label}: weight must be {LOSS_WEIGHT_TEXT}, got {w!r}")
    return abs(w)  # -0.0 is 0


def _iter_raw(source: Source, skip_invalid: bool, skipped: list):
    """Yield (where, raw_record) with where = {'line': n} or {'record': i}."""
    path = source.path
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for n, bline in enumerate(source.stream(), 1):
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
        yield from _json_records(path, decode_utf8(path, source.read_all()))
    elif suffix == ".csv":
        yield from _csv_records(path, decode_utf8(path, source.read_all()), skip_invalid, skipped)
    elif suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = source.read_all()  # once, through the hash; parsed from memory
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise InputError(str(path), f"cannot read Parquet: {str(e).splitlines()[0] if str(e) else e}") from None
        for i, raw in enumerate(table.to_pylist()):
            yield {"record": i}, raw
    else:
        raise InputError(str(path), f"unsupported file type '{suffix}' (expected .jsonl, .json, .csv or .parquet)")


def _json_records(path: Path, text: str):
    try:
        data = loads_json(text, check=False)  # each record is checked as it is read, so the error names it
    except ValueError as e:
        raise InputError(str(path), str(e), line=getattr(e, "lineno", None)) from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), None) if "messages" not in data else [data]
    if not isinstance(data, list):
        raise InputError(str(path), "expected a JSON array of records")
    for i, raw in enumerate(data):
        yield {"record": i}, raw


def _csv_records(path: Path, text: str, skip_invalid: bool, skipped: list):
    """Rows of a CSV file as dicts by its header; a row with more or fewer fields than the header is a bad record
    (csv.DictReader would silently drop the extra field, or fill the missing one with nothing)."""
    # csv's default field limit (131,072 characters) is no property of the data: a long response is fine. No field
    # can be longer than the file, so that is the limit while this file is read.
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, len(text) + 1))
    i = -1
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if not row:  # a blank line is no record (as csv.DictReader has it)
                continue
            i += 1
            if len(row) != len(header):
                err = InputError(str(path), f"row has {len(row)} fields, the header has {len(header)}", record=i)
                if not skip_invalid:
                    raise err
                skipped.append(err)
                continue
            yield {"record": i}, dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise InputError(str(path), f"malformed CSV: {e}", record=i + 1) from None
    finally:
        csv.field_size_limit(old)
