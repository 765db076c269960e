"""Open the raw table of a Hub dataset id or a local dataset directory with `datasets` (see records/sources.py).

A Hub id is fetched with huggingface_hub's `snapshot_download` into the standard cache (HF_HOME / HF_HUB_CACHE),
data files and the dataset card only: no loading scripts ever run. The snapshot is then read with
`datasets.load_dataset` as a local folder (honouring the card's `configs:`), whose Arrow cache is the standard
HF_DATASETS_CACHE. Reading the snapshot rather than asking `datasets` for the id is what makes a cached dataset
load with HF_HUB_OFFLINE=1: offline, `datasets` only finds ids it has converted before.
"""

from __future__ import annotations

import re
from pathlib import Path

from imtune.errors import ImtuneError

HUB_DATA_FILES = ["README.md", "*.parquet", "*.arrow", "*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz", "*.ndjson",
                  "*.csv", "*.csv.gz"]
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `save_to_disk` writes


def open_raw(spec) -> tuple:
    """(datasets.Dataset, name for messages, identity for the fingerprint) of a Hub id or local directory."""
    local = Path(spec.path).expanduser()
    if spec.path.startswith("hf://") or not local.exists():
        repo = hub_repo_id(spec.path)
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
            raise ImtuneError(f"--data {spec.path}: not a Hub dataset id (expected ORG/NAME or hf://datasets/ORG/NAME)")
        snap = hub_snapshot(repo, spec.revision)
        name = _name(repo + (f"@{spec.revision}" if spec.revision else ""), spec)
        return _load_folder(snap, spec, name), name, ["hub", repo, snap.name, spec.config, spec.split]
    if spec.revision:
        raise ImtuneError(f"--data-revision applies to Hub dataset ids only, not to the directory {spec.path}")
    if any((local / m).is_file() for m in SAVED_MARKERS):
        return _load_saved(local, spec)
    name = _name(str(local), spec)
    ds = _load_folder(local, spec, name)
    return ds, name, ["dir", str(local.resolve()), ds._fingerprint, spec.config, spec.split]


def hub_repo_id(s: str) -> str:
    for prefix in ("hf://datasets/", "hf://"):
        if s.startswith(prefix):
            return s[len(prefix):].strip("/")
    return s


def _name(what: str, spec) -> str:
    return f"{what} (" + (f"config {spec.config}, " if spec.config else "") + f"split {spec.split})"


def _load_saved(path: Path, spec) -> tuple:
    from datasets import DatasetDict, load_from_disk

    if spec.config:
        raise ImtuneError(f"--data-config does not apply to a dataset saved with save_to_disk ({path})")
    try:
        obj = load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise ImtuneError(f"{path}: cannot read the saved dataset: {_first_line(e)}") from None
    if isinstance(obj, DatasetDict):
        if spec.split not in obj:
            raise ImtuneError(f"{path}: no split {spec.split!r} (it has: {', '.join(obj)}); use --data-split")
        name = _name(str(path), spec)
        obj = obj[spec.split]
    else:
        name = str(path)
    return obj, name, ["disk", str(path.resolve()), obj._fingerprint, spec.split]


def _load_folder(folder: Path, spec, name: str):
    import pyarrow as pa
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return load_dataset(str(folder), name=spec.config, split=spec.split)
    except DatasetGenerationError as e:  # a data file that does not parse: the reason is in the cause
        raise ImtuneError(f"{name}: cannot read its data files: {_first_line(e.__cause__ or e)}") from None
    except (ValueError, KeyError, OSError, pa.ArrowException) as e:  # unknown split or config, no data files
        raise ImtuneError(f"{name}: {_first_line(e)}") from None


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot of a Hub dataset's data files (downloaded if needed and allowed; `imtune.hub`)."""
    from imtune.hub import snapshot

    return snapshot(repo_id, "dataset", revision, HUB_DATA_FILES, "a local data file")


def _first_line(e: BaseException) -> str:
    from imtune.hub import first_line

    return first_line(e)  # never prints the token
