"""The one way imtune reads a file it is given: data files, configs, JSON inputs, checkpoints' metadata.

One rule for every input: only a regular file is opened (a directory, FIFO, socket or device such as /dev/zero is
refused from its `stat`, and the open is non-blocking, so a FIFO swapped in after the check cannot hang the run); its
bytes are read once, hashed while they are read (`Source`), bounded in size (JSON and YAML inputs) and nesting, and
checked unchanged from the start of the read to its end before anything built from them is trusted or cached (a
file edited in place with its time stamps restored still changes its content hash; a file that grows or is rewritten
while it is read is refused, not half-used). Every problem is an `InputError`: one line naming the file, the line
or record where known, and the reason; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import sys
from pathlib import Path

from imtune.errors import InputError

MAX_JSON_BYTES = 512 << 20  # a JSON / JSONL input other than training data (judge outputs, samples, evidence, rows)
MAX_CONFIG_BYTES = 4 << 20  # a YAML config: far more than any real one, far less than a "billion laughs"
MAX_DEPTH = 100  # JSON / YAML nesting: no input imtune reads nests deeper than a few levels
READ_CHUNK = 1 << 20


# ---- which files may be opened ---------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _stat_reason(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop (the link points, directly or not, back to itself)"
    if e.errno == errno.ENOENT:
        try:
            if path.is_symlink():
                return f"broken symlink (to {os.readlink(path)}, which does not exist)"
        except OSError:
            pass
        return "file not found"
    if e.errno == errno.EACCES:
        return "cannot reach the file: permission denied (a directory on its path cannot be searched)"
    if e.errno == errno.ENOTDIR:
        return "not found (a part of the path is a file, not a directory)"
    return f"cannot read the file: {e.strerror or e}"


def stat_input(path: str | Path) -> os.stat_result | None:
    """`os.stat` of a path that may not exist (None then); any other failure, such as a directory on the path that
    cannot be searched, is an `InputError` instead of a traceback."""
    try:
        return os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise InputError(str(path), _stat_reason(Path(path), e)) from None


def check_regular(path: str | Path, what: str = "file") -> os.stat_result:
    """Refuse what is not a regular file before opening it: a FIFO would block forever, /dev/zero never ends."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(str(path), _stat_reason(path, e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(str(path), f"is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(str(path), f"is {_kind(st.st_mode)}, not a regular file")
    return st


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


# ---- reading a file once, hashed as it is read ------------------------------------------------------------------------

class _Raw(io.RawIOBase):
    """The raw stream a `Source` hands to io.BufferedReader; closing it leaves the source open (to be checked)."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.source.readinto(b)


class Source:
    """A regular file opened for one read: every byte read goes through sha256, and `check_unchanged` refuses a file
    that changed (size, time stamps, inode, or bytes read short of its size) between the open and the end. Use it
    as a context manager."""

    def __init__(self, path: str | Path, what: str = "file"):
        self.path = Path(path)
        check_regular(self.path, what)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise InputError(str(self.path), f"cannot read the file: {e.strerror or e}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced by something else between the stat and the open
            os.close(fd)
            raise InputError(str(self.path), f"is {_kind(st.st_mode)}, not a regular file")
        self._file = io.FileIO(fd, "rb", closefd=True)
        self.start, self.nbytes, self.hash = st, 0, hashlib.sha256()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def readinto(self, b) -> int:
        try:
            n = self._file.readinto(b)
        except OSError as e:
            raise InputError(str(self.path), f"cannot read the file: {e.strerror or e}") from None
        if n:
            self.hash.update(memoryview(b)[:n])
            self.nbytes += n
        return n

    def stream(self) -> io.BufferedReader:
        """Buffered reads (line iteration) that still pass through the hash."""
        return io.BufferedReader(_Raw(self), buffer_size=READ_CHUNK)

    def read_all(self, limit: int | None = None) -> bytearray:
        """The whole file, read into one buffer of its size (no copy); a file that grew is refused here."""
        size = self.start.st_size
        if limit is not None and size > limit:
            raise InputError(str(self.path), f"too large ({size:,} bytes; at most {limit:,} read)")
        out = bytearray(size + 1)  # one byte more than the file had: a read that fills it saw the file grow
        n = 0
        with memoryview(out) as view:
            while n < len(out) and (k := self.readinto(view[n:])):
                n += k
        if n > size:
            self.check_unchanged()
        del out[n:]
        return out

    def drain(self) -> None:
        buf = bytearray(READ_CHUNK)
        while self.readinto(buf):
            pass

    def digest(self) -> str:
        return self.hash.hexdigest()

    def check_unchanged(self) -> None:
        """Call after reading to the end: the bytes hashed are the whole file as it was when the read began."""
        now = os.fstat(self._file.fileno())
        try:
            named = os.stat(self.path)
        except OSError:
            named = None
        if _identity(now) != _identity(self.start) or named is None or _identity(named) != _identity(self.start) \
                or self.nbytes != self.start.st_size:
            raise InputError(str(self.path), f"changed while it was being read ({self.start.st_size:,} bytes when "
                                             f"opened, {self.nbytes:,} read); run again once nothing writes to it")


def file_digest(path: str | Path) -> str:
    """sha256 of a regular file's content, read once and checked unchanged over the read."""
    with Source(path) as src:
        src.drain()
        src.check_unchanged()
        return src.digest()


def read_bytes(path: str | Path, what: str = "file", limit: int | None = MAX_JSON_BYTES) -> bytearray:
    with Source(path, what) as src:
        data = src.read_all(limit)
        src.check_unchanged()
    return data


def decode_utf8(path: str | Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(str(path), f"not valid UTF-8 (byte {e.start})", line=line) from None


def read_text(path: str | Path, what: str = "file", limit: int | None = MAX_JSON_BYTES) -> str:
    return decode_utf8(path, read_bytes(path, what, limit))


def load_input(path: str | Path, what: str, loader):
    """`loader(path)` for a file a library reads itself (safetensors weights, torch's optimizer state): a regular
    file only, and whatever the library raises on a truncated or corrupt one (its errors differ by format and
    version) becomes one line naming the file."""
    check_regular(path, what)
    try:
        return loader(str(path))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - scoped to this one load; the message keeps the library's reason
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # the library's first sentence
        raise InputError(str(path), f"unreadable {what}: {type(e).__name__}" + (f": {reason}" if reason else "")) \
            from None


# ---- JSON -----------------------------------------------------------------------------------------------------------

class JSONObject(dict):
    """A parsed JSON object that remembers keys it saw twice (plain json keeps the last one silently)."""
    __slots__ = ("duplicates",)


def _object_pairs(pairs) -> JSONObject:
    obj = JSONObject()
    obj.duplicates = []
    for k, v in pairs:
        if k in obj:
            obj.duplicates.append(k)
        obj[k] = v
    return obj


class HugeInt:
    """An integer literal too long for int() (Python refuses > 4300 digits): reported with its record."""
    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(s: str):
    limit = sys.get_int_max_str_digits()
    return HugeInt(len(s)) if limit and len(s) > limit else int(s)


def check_parsed(raw) -> None:
    """ValueError for a duplicate key, an unreadable integer or nesting deeper than MAX_DEPTH anywhere in `raw`."""
    stack = [(raw, 0)]  # iterative: a value may nest deeper than Python's recursion limit allows
    while stack:
        node, depth = stack.pop()
        if isinstance(node, HugeInt):
            raise ValueError(f"integer with {node.digits} digits (more than Python reads: {sys.get_int_max_str_digits()})")
        if depth > MAX_DEPTH and isinstance(node, (dict, list)):
            raise ValueError(f"JSON nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(node, dict):
            if getattr(node, "duplicates", None):
                raise ValueError(f"duplicate key {node.duplicates[0]!r} in a JSON object (which value is meant?)")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def loads_json(text: str, check: bool = True):
    """json.loads with imtune's checks; every failure is a ValueError with a one-line reason (and `.lineno`).
    `check=False` leaves `check_parsed` to the caller (a data file checks each record, to name it)."""
    try:
        value = json.loads(text, object_pairs_hook=_object_pairs, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise _located(f"malformed JSON: {e.msg} at column {e.colno}", e.lineno) from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"unreadable JSON value: {str(e).split(';')[0]}") from None
    if check:
        check_parsed(value)
    return value


def _located(reason: str, lineno: int) -> ValueError:
    e = ValueError(reason)
    e.lineno = lineno
    return e


def read_json(path: str | Path, what: str = "JSON file", limit: int = MAX_JSON_BYTES):
    text = read_text(path, what, limit)
    try:
        return loads_json(text)
    except ValueError as e:
        raise InputError(str(path), str(e), line=getattr(e, "lineno", None)) from None


def read_json_object(path: str | Path, what: str = "JSON file", limit: int = MAX_JSON_BYTES) -> dict:
    value = read_json(path, what, limit)
    if not isinstance(value, dict):
        raise InputError(str(path), f"expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(v), "a number")


def read_json_records(path: str | Path, what: str = "records", empty_ok: bool = False,
                      jsonl_only: bool = False) -> list[tuple[dict, object]]:
    """(where, value) for each record of a .json array or a JSONL file (told apart by the first character), where
    {'record': i} or {'line': n}: what a judge's outputs or answers file holds."""
    text = read_text(path, what)
    if not jsonl_only and text.lstrip().startswith("["):
        try:
            return [({"record": i}, r) for i, r in enumerate(loads_json(text))]
        except ValueError as e:
            raise InputError(str(path), str(e), line=getattr(e, "lineno", None)) from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(({"line": n}, loads_json(line)))
            except ValueError as e:
                raise InputError(str(path), str(e), line=n) from None
    if not rows and not empty_ok:
        raise InputError(str(path), f"no {what}")
    return rows


def read_jsonl_rows(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None,
                    what: str = "rows", empty_ok: bool = False) -> list[dict]:
    """JSON objects of a JSONL file, each checked for `required` fields/types; errors name the file and line."""
    rows = []
    for where, row in read_json_records(path, what, empty_ok, jsonl_only=True):
        if not isinstance(row, dict):
            raise InputError(str(path), f"expected a JSON object, got {_json_type(row)}", **where)
        for key, typ in (required or {}).items():
            if not isinstance(row.get(key), typ) or isinstance(row.get(key), bool):
                got = "missing" if key not in row else f"not a {_type_name(typ)} ({type(row[key]).__name__})"
                raise InputError(str(path), f"field '{key}' {got}", **where)
        rows.append(row)
    return rows


def _type_name(typ) -> str:
    names = {str: "string", int: "number", float: "number", list: "list", dict: "object"}
    typs = typ if isinstance(typ, tuple) else (typ,)
    return "/".join(dict.fromkeys(names.get(t, t.__name__) for t in typs))


# ---- YAML -----------------------------------------------------------------------------------------------------------

def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """Safe YAML without aliases (a "billion laughs" expands aliases; a config never needs them) and without
        duplicate keys (PyYAML silently keeps the last; which one did the user mean?)."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.MarkedYAMLError(problem=f"alias *{event.anchor} (anchors and aliases are not allowed)",
                                           problem_mark=event.start_mark)
            self.depth = getattr(self, "depth", 0) + 1
            try:
                if self.depth > MAX_DEPTH:
                    raise yaml.MarkedYAMLError(problem=f"nested too deeply (more than {MAX_DEPTH} levels)",
                                               problem_mark=self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # an unhashable key: SafeLoader itself refuses it
                if key in seen:
                    raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r} (which value is meant?)",
                                               problem_mark=key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def read_yaml(path: str | Path, what: str = "config file"):
    """A YAML file as Python values (bounded size, UTF-8, no aliases, no duplicate keys)."""
    import yaml

    text = read_text(path, what, MAX_CONFIG_BYTES)
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(str(path), f"malformed YAML: {reason}", line=mark.line + 1 if mark else None) from None
    except RecursionError:
        raise InputError(str(path), "malformed YAML: nested too deeply") from None
