"""Every `--data` as one canonical Arrow table: a local file, a Hugging Face Hub dataset id, or a dataset directory.

The canonical table (`ConversationTable.dataset`) has the columns `id: string`, `row: int64` (the source line or
row, for error messages) and `messages: list<struct<role: string, content: string, weight: double>>` (weight null
when the message has none), memory-mapped from a cache
entry `<cache>/<fingerprint>/` that is built once in a temporary directory, completed by a marker written last and
then renamed into place, so an interrupted build is never trusted. Records are validated by the same functions as
`records.loading` (`detect_schema`, `normalise`), so a bad row gives the same one-line `InputError`.

Hub ids are resolved with huggingface_hub into the standard cache (data files and the dataset card only, never
loading scripts), and read with `datasets` from that snapshot, so a cached dataset loads with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imtune.config import DEFAULT_DATA_SPLIT
from imtune.errors import ImtuneError, InputError
from imtune.gguf import cache_root
from imtune.inputs import Source, file_digest, stat_input
from imtune.io_utils import atomic_write_text, children_die_with_us, remove_dead_builds
from imtune.records.conversation import Conversation, Message
from imtune.records.parsing import (
    DATA_SUFFIXES,
    SCHEMAS,
    LoadResult,
    check_data_file,
    detect_schema,
    iter_conversations,
    normalise,
)

# Part of every fingerprint: bump it when validation or the table's layout changes, so old cache entries are unused.
TABLE_VERSION = 4  # 2: CSV rows with more or fewer fields than the header are refused; 3: messages carry `weight`
# 4: a weight outside 0 or [1e-6, 1e6], or a record-level `weight`, is refused (a table built before would keep it)
MARKER = "complete.json"
TMP_PATTERN = r"\.[0-9a-f]{32}\.tmp-(\d+)"  # a build's directory: .<random>.tmp-<pid>
SKIPPED_ROWS_SHOWN = 5
ROWS_PER_WORKER = 5000  # below this many rows per process, starting a worker costs more than it saves


@dataclass(frozen=True)
class DataSpec:
    """What the user named: a path or Hub id, and which split / config / revision / schema of it."""

    path: str
    split: str = DEFAULT_DATA_SPLIT
    config: str | None = None
    revision: str | None = None
    format: str | None = None

    @classmethod
    def of(cls, cfg) -> DataSpec:
        return cls(str(cfg.data), getattr(cfg, "data_split", None) or DEFAULT_DATA_SPLIT,
                   getattr(cfg, "data_config", None), getattr(cfg, "data_revision", None),
                   getattr(cfg, "data_format", None))


def is_table_source(path: str | Path) -> bool:
    """A Hub dataset id or a local directory (read with `datasets`) rather than one data file. A path that exists
    is always a path; a missing name ending in a data-file suffix is a missing file, not a Hub id."""
    s = str(path)
    if not s.strip():  # Path("") is the working directory: every file under it would be read as the dataset
        raise ImtuneError(f"data {s!r}: an empty name is not a data file, directory or Hub dataset id")
    if s.startswith("hf://"):
        return True
    st = stat_input(Path(s).expanduser())
    if st is not None:
        return stat.S_ISDIR(st.st_mode)
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) is not None and not s.lower().endswith(DATA_SUFFIXES)


def is_hub_id(s: str) -> bool:
    """ORG/NAME (or hf://datasets/ORG/NAME, hf://ORG/NAME) that is not an existing path."""
    return is_table_source(s) and stat_input(Path(str(s)).expanduser()) is None


def source_key(s: str | None) -> str | None:
    """How a record of what was read names a source: a file or directory by its absolute path, a Hub id as given."""
    return s and (s if is_hub_id(s) else str(Path(s).expanduser().resolve()))


@dataclass
class ConversationTable:
    dataset: object  # datasets.Dataset with the canonical columns id, row, messages
    name: str  # what error messages call it: the file path, or "ORG/NAME (split train)"
    fingerprint: str  # stable for the same content, changes with it
    skipped: dict  # reason -> {"count": int, "rows": [first few rows]}
    row_kind: str = "record"  # "line" (JSONL line numbers) or "record" (0-based rows)
    errors: list = field(default_factory=list, repr=False)  # every skipped (row, reason)

    def source_of(self, row: int) -> str:
        return f"{self.name}:{row}" if self.row_kind == "line" else f"{self.name}: record {row}"

    def conversations(self) -> Iterator[Conversation]:
        for r in self.dataset:
            c = conversation_of(r)
            yield Conversation(c.messages, c.id, source=self.source_of(r["row"]))

    def skipped_errors(self) -> list[InputError]:
        return [InputError(self.name, reason, **{self.row_kind: row}) for row, reason in self.errors]


def conversation_of(row: dict) -> Conversation:
    """A canonical row -> Conversation (no validation: the table holds validated records only)."""
    return Conversation(tuple(Message(m["role"], m["content"], m.get("weight")) for m in row["messages"]),
                        id=row["id"])


def load_conversations(spec: DataSpec, skip_invalid: bool = False) -> LoadResult:
    """The in-memory form (a list of Conversations) of a Hub dataset or dataset directory."""
    table = conversation_table(spec, skip_invalid=skip_invalid)
    return LoadResult(list(table.conversations()), table.skipped_errors(), table.fingerprint)


def conversation_table(spec: DataSpec, *, skip_invalid: bool = False, num_proc: int | None = None,
                       cache_dir: Path | None = None) -> ConversationTable:
    """The canonical table of `spec`, built once per fingerprint; bad records raise `InputError` (one line, naming
    the file or dataset and the line or row) unless `skip_invalid`."""
    if spec.format is not None and spec.format not in SCHEMAS:
        raise ImtuneError(f"unknown --format {spec.format!r}; choose one of {', '.join(SCHEMAS)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with quiet_datasets():
        if is_table_source(spec.path):
            from imtune.records.hub_sources import open_raw

            raw_of, name, identity = open_raw(spec)
            fp = _digest(["table", *identity, spec.format])
            entry = root / fp
            if _marker(entry) is None:
                _build(entry, lambda tmp: _normalise_table(raw_of(), name, spec.format, tmp, skip_invalid, num_proc))
            row_kind = "record"
        else:
            path = Path(spec.path).expanduser()
            check_data_file(path)
            check_file_spec(spec)
            name, fp = str(path), _file_entry(path, spec.format, root, skip_invalid)
            entry = root / fp
            row_kind = "line" if path.suffix.lower() in (".jsonl", ".ndjson") else "record"
        return _open_entry(entry, name, fp, row_kind, skip_invalid)


def default_cache_dir() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "imtune" / "conversations"


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps([TABLE_VERSION, *parts]).encode()).hexdigest()[:32]


def file_fingerprint(path: Path, digest: str, format: str | None) -> str:
    """A data file's fingerprint: the sha256 of its bytes, its suffix (which says how they are parsed) and the schema
    asked for. Not its name or time stamps: a copied or touched file is the same data (and a resumed run may use it)."""
    return _digest(["file", Path(path).suffix.lower(), digest, format])


def _file_entry(path: Path, format: str | None, root: Path, skip_invalid: bool) -> str:
    """The fingerprint of a data file's table in `root`, built if needed. The content decides, never time stamps:
    a file whose (path, inode, size, times) were seen before with a table built is hashed (one read) and its table
    reused only if the hash matches; anything else is parsed, hashed as it is parsed (one read), and its table
    committed under the hash of the bytes parsed, only if the file did not change during the read."""
    hint = _remembered_digest(path)
    if hint is not None and _marker(root / file_fingerprint(path, hint, format)) is not None:
        digest = file_digest(path)
        fp = file_fingerprint(path, digest, format)
        if _marker(root / fp) is not None:
            _remember(path, os.stat(path), digest)
            return fp
    return _build_file_table(path, format, root, skip_invalid)


def _memo_path(path: Path, st: os.stat_result) -> Path:
    return cache_root() / "digests" / _digest(
        [str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])


def _remembered_digest(path: Path) -> str | None:
    """The digest last seen for this file with these stat fields: only a hint of which table to check first (a
    file edited in place with its time stamps restored has the same stat fields and a different hash)."""
    try:
        return _memo_path(path, os.stat(path)).read_text().strip() or None
    except OSError:
        return None


def _remember(path: Path, st: os.stat_result, digest: str) -> None:
    with contextlib.suppress(OSError):  # an unwritable cache only costs the next run a parse
        atomic_write_text(_memo_path(path, st), digest, own=False)


def check_file_spec(spec: DataSpec) -> None:
    """A split, config or revision names part of a Hub dataset or dataset directory; a data file has none, and
    silently reading all of it instead would train on data the user did not ask for."""
    given = [flag for flag, v in (("--data-split", spec.split if spec.split != DEFAULT_DATA_SPLIT else None),
                                  ("--data-config", spec.config), ("--data-revision", spec.revision)) if v]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise ImtuneError(f"--data {spec.path} is a data file: {', '.join(given)} {verb} only to a Hub dataset id "
                          "or a dataset directory")


def features():
    from datasets import Features, List, Value

    return Features({"id": Value("string"), "row": Value("int64"),
                     "messages": List({"role": Value("string"), "content": Value("string"),
                                       "weight": Value("float64")})})


def _work_features():
    from datasets import Value

    f = features()
    f["_error"] = Value("string")  # the reason a row is invalid (null when valid); dropped from the final table
    return f


# ---- cache entries ------------------------------------------------------------------------------------------------

def _marker(entry: Path) -> dict | None:
    try:
        return json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _build(entry: Path, write) -> None:
    """Run `write(tmp_dir) -> marker dict` in a private temporary directory; the marker is written last and the
    directory renamed into place, so a failed or killed build leaves nothing a later run would trust."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    if _marker(entry) is not None:  # another process completed it meanwhile
        return
    tmp = _new_build_dir(entry.parent)
    try:
        _commit(tmp, entry, write(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _new_build_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(root, TMP_PATTERN)
    tmp = root / f".{uuid.uuid4().hex}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, entry: Path, marker: dict) -> None:
    """Write the marker last, then rename the build into place (unless another process finished it first)."""
    if _marker(entry) is not None:
        return
    if entry.exists():  # an entry without its marker is not complete (imtune wrote it: the cache is imtune's own)
        shutil.rmtree(entry, ignore_errors=True)
    (tmp / MARKER).write_text(json.dumps(marker))
    try:
        os.rename(tmp, entry)
    except OSError:  # another process finished the same entry first: its copy is as good as ours
        if _marker(entry) is None:
            raise


def _open_entry(entry: Path, name: str, fp: str, row_kind: str, skip_invalid: bool) -> ConversationTable:
    from datasets import Dataset, concatenate_datasets

    marker = _marker(entry)
    errors = [tuple(e) for e in marker["errors"]]
    if errors and not skip_invalid:  # built by an earlier --skip-invalid run: this run asked to stop at a bad row
        row, reason = errors[0]
        raise InputError(name, reason, **{row_kind: row})
    parts = [Dataset.from_file(str(entry / f)) for f in marker["files"]]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    ds = ds.remove_columns([c for c in ds.column_names if c == "_error"])
    return ConversationTable(ds, name, fp, summarise_skipped(errors), row_kind, errors)


def summarise_skipped(errors: list[tuple[int, str]]) -> dict:
    """reason -> {"count", "rows": the first few rows with that reason}, in order of first occurrence."""
    out: dict[str, dict] = {}
    for row, reason in errors:
        s = out.setdefault(reason, {"count": 0, "rows": []})
        s["count"] += 1
        if len(s["rows"]) < SKIPPED_ROWS_SHOWN:
            s["rows"].append(row)
    return out


def _row_message(m: Message) -> dict:
    return {"role": m.role, "content": m.content, "weight": m.weight}


# ---- local data files -----------------------------------------------------------------------------------------------

def _build_file_table(path: Path, format: str | None, root: Path, skip_invalid: bool) -> str:
    """Parse the file (read once, hashed as it is read) into a build directory, then commit it under the
    fingerprint of the bytes parsed; a file that changed during the read raises before anything is committed."""
    tmp = _new_build_dir(root)
    try:
        marker, digest, st = _write_file_table(path, format, tmp, skip_invalid)
        fp = file_fingerprint(path, digest, format)
        _commit(tmp, root / fp, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remember(path, st, digest)
    return fp


def _write_file_table(path: Path, format: str | None, tmp: Path, skip_invalid: bool):
    """Stream the file's records (parsed and validated by records.parsing) into an Arrow file, never holding them
    all as Python objects: (marker, sha256 of the bytes parsed, the file's stat when the read began)."""
    from datasets.arrow_writer import ArrowWriter

    skipped: list[InputError] = []
    writer = ArrowWriter(features=features(), path=str(tmp / "table.arrow"), writer_batch_size=1000)
    try:
        with Source(path, "data file") as src:
            for where, conv in iter_conversations(src, format, skip_invalid, skipped):
                writer.write({"id": conv.id, "row": where.get("line", where.get("record")),
                              "messages": [_row_message(m) for m in conv.messages]})
        n, _ = writer.finalize()
    finally:
        writer.close()
    errors = [(e.line if e.line is not None else e.record, e.reason) for e in skipped]
    if not n:
        raise InputError(str(path), "no valid records" + (f" ({len(errors)} skipped)" if errors else ""))
    return {"files": ["table.arrow"], "rows": n, "errors": errors}, src.digest(), src.start


# ---- Hub datasets and dataset directories -----------------------------------------------------------------------------

def _normalise_table(raw, name: str, format: str | None, tmp: Path, skip_invalid: bool, num_proc: int | None) -> dict:
    """Detect the schema once from the columns, then validate and normalise every row in `num_proc` processes."""
    import pyarrow.compute as pc

    if len(raw) == 0:
        raise InputError(name, "no records (the split is empty)")
    try:
        schema = format or detect_schema(dict.fromkeys(raw.column_names))
    except ValueError as e:
        raise InputError(name, str(e)) from None
    procs = num_proc if num_proc is not None else max(1, min(os.cpu_count() or 1, len(raw) // ROWS_PER_WORKER))
    with children_die_with_us():  # a killed imtune leaves no worker behind
        out = raw.map(_normalise_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                      features=_work_features(), num_proc=procs if procs > 1 else None, load_from_cache_file=False,
                      cache_file_name=str(tmp / "map.arrow"),
                      fn_kwargs={"schema": schema, "name": name, "skip_invalid": skip_invalid})
    table = out.data
    bad = pc.is_valid(table.column("_error"))
    rows, reasons = pc.filter(table.column("row"), bad).to_pylist(), pc.filter(table.column("_error"), bad).to_pylist()
    errors = list(zip(rows, reasons, strict=True))
    files = [Path(f["filename"]).name for f in out.cache_files]
    if errors:  # rewrite without the bad rows (rare), and drop the unfiltered copy
        files = [_write_valid_rows(table, tmp / "table.arrow")]
        for f in out.cache_files:
            Path(f["filename"]).unlink(missing_ok=True)
    if len(errors) == len(raw):
        raise InputError(name, f"no valid records ({len(errors)} skipped)")
    return {"files": files, "rows": len(raw) - len(errors), "errors": errors}


def _write_valid_rows(table, dest: Path) -> str:
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(features=_work_features(), path=str(dest))
    try:
        for batch in table.to_batches(max_chunksize=10_000):
            writer.write_table(pa.Table.from_batches([batch.filter(pc.is_null(batch.column("_error")))]))
        writer.finalize()
    finally:
        writer.close()
    return dest.name


def _normalise_batch(batch: dict, indices: list[int], schema: str, name: str, skip_invalid: bool) -> dict:
    """Runs in `datasets`' worker processes: an `InputError` raised here reaches the parent intact (it pickles)."""
    cols = list(batch)
    out: dict[str, list] = {"id": [], "row": [], "messages": [], "_error": []}
    for k, row in enumerate(indices):
        raw = {c: batch[c][k] for c in cols}
        try:
            conv = normalise(raw, schema, id_default=str(row))
        except ValueError as e:
            if not skip_invalid:
                raise InputError(name, str(e), record=row) from None
            out["id"].append("")
            out["messages"].append([])
            out["_error"].append(str(e))
        else:
            out["id"].append(conv.id)
            out["messages"].append([_row_message(m) for m in conv.messages])
            out["_error"].append(None)
        out["row"].append(row)
    return out


class quiet_datasets:
    """No progress bars or info logs from `datasets` while imtune reads data: a failure must stay one line."""

    def __enter__(self):
        from datasets.utils import logging as dlog
        from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars

        self._bars_were_on = not are_progress_bars_disabled()
        self._level = dlog.get_verbosity()
        disable_progress_bars()
        dlog.set_verbosity_error()

    def __exit__(self, *exc):
        from datasets.utils import logging as dlog
        from datasets.utils.tqdm import enable_progress_bars

        dlog.set_verbosity(self._level)
        if self._bars_were_on:
            enable_progress_bars()
