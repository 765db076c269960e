"""Load instruction data as Conversations: a data file (JSONL / JSON / CSV / Parquet, any of four schemas), a
Hugging Face Hub dataset id or a dataset directory, validated record by record.

Every problem is reported as an `InputError` naming the file or dataset, the line (JSONL, and JSON/CSV where known)
or record index, and the reason. With `skip_invalid=True` bad records are skipped and returned in
`LoadResult.skipped`. Parsing lives in records/parsing.py, Hub datasets and directories in records/sources.py.
"""

from __future__ import annotations

from pathlib import Path

from imtune.config import DEFAULT_DATA_SPLIT
from imtune.errors import ImtuneError, InputError
from imtune.inputs import Source
from imtune.records.conversation import Conversation
from imtune.records.parsing import (  # noqa: F401  (detect_schema, normalise, ...: the module's old API)
    SCHEMAS,
    SHAREGPT_ROLES,
    LoadResult,
    check_data_file,
    detect_schema,
    iter_conversations,
    normalise,
)
from imtune.records.sources import (
    DataSpec,
    check_file_spec,
    file_fingerprint,
    is_table_source,
    load_conversations,
    summarise_skipped,
)


def load_records(path: str | Path, format: str | None = None, skip_invalid: bool = False,
                 **source) -> list[Conversation]:
    """Load and validate a data file, Hub dataset or dataset directory (`source`: split, config, revision); raise
    `InputError` on the first bad record unless `skip_invalid`."""
    return load_dataset(path, format=format, skip_invalid=skip_invalid, **source).records


def load_dataset(path: str | Path, format: str | None = None, skip_invalid: bool = False, *,
                 split: str = DEFAULT_DATA_SPLIT,
                 config: str | None = None, revision: str | None = None) -> LoadResult:
    """Records of a data file, a Hub dataset id (ORG/NAME, hf://datasets/ORG/NAME) or a local dataset directory;
    `split`, `config` and `revision` apply to the latter two only (see records/sources.py)."""
    if format is not None and format not in SCHEMAS:
        raise ImtuneError(f"unknown --format {format!r}; choose one of {', '.join(SCHEMAS)}")
    if is_table_source(path):
        return load_conversations(DataSpec(str(path), split, config, revision, format), skip_invalid)
    path = Path(path)
    check_data_file(path)
    check_file_spec(DataSpec(str(path), split, config, revision, format))
    result = LoadResult(records=[])
    with Source(path, "data file") as src:  # read once: parsed and hashed together
        result.records.extend(conv for _, conv in iter_conversations(src, format, skip_invalid, result.skipped))
    result.fingerprint = file_fingerprint(path, src.digest(), format)
    if not result.records:
        raise InputError(str(path), "no valid records" + (f" ({len(result.skipped)} skipped)" if result.skipped else ""))
    return result


def describe_skipped(skipped: list[InputError], name: str, shown: int = 3) -> str:
    """One line: how many records were skipped and why, counted per reason, with the first few places of each."""
    by_reason = summarise_skipped([(f"line {e.line}" if e.line is not None else f"record {e.record}", e.reason)
                                   for e in skipped])
    parts = [f"{s['count']}x {reason} ({', '.join(s['rows'][:shown])}{', ...' if s['count'] > shown else ''})"
             for reason, s in list(by_reason.items())[:5]]
    more = f"; +{len(by_reason) - 5} other reason(s)" if len(by_reason) > 5 else ""
    return f"skipped {len(skipped)} invalid record(s) in {name}: " + "; ".join(parts) + more
