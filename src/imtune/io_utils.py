"""Atomic writes: outputs go to a temp name beside the target and are renamed, so nothing is half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl_rows(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None,
                    what: str = "rows") -> list[dict]:
    """JSON objects of a JSONL file, each checked for `required` fields/types; errors name the file and line."""
    from imtune.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "file not found" if not path.exists() else "not a file")
    rows = []
    with open(path, "rb") as f:
        for n, bline in enumerate(f, 1):
            if not bline.strip():
                continue
            try:
                row = json.loads(bline.decode("utf-8-sig" if n == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(str(path), f"not valid UTF-8 (byte {e.start} of the line)", line=n) from None
            except json.JSONDecodeError as e:
                raise InputError(str(path), f"malformed JSON: {e.msg} at column {e.colno}", line=n) from None
            if not isinstance(row, dict):
                raise InputError(str(path), f"expected a JSON object, got {type(row).__name__}", line=n)
            for key, typ in (required or {}).items():
                if not isinstance(row.get(key), typ) or isinstance(row.get(key), bool):
                    got = "missing" if key not in row else f"not a {_type_name(typ)} ({type(row[key]).__name__})"
                    raise InputError(str(path), f"field '{key}' {got}", line=n)
            rows.append(row)
    if not rows:
        raise InputError(str(path), f"no {what}")
    return rows


def _type_name(typ) -> str:
    names = {str: "string", int: "number", float: "number", list: "list", dict: "object"}
    typs = typ if isinstance(typ, tuple) else (typ,)
    return "/".join(dict.fromkeys(names.get(t, t.__name__) for t in typs))
