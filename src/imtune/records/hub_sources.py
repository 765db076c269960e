"""Open the raw table of a Hub dataset id or a local dataset directory with `datasets` (see records/sources.py).

A Hub id is fetched with huggingface_hub's `snapshot_download` into the standard cache (HF_HOME / HF_HUB_CACHE),
data files and the dataset card only: no loading scripts ever run. The snapshot is then read with
`datasets.load_dataset` as a local folder (honouring the card's `configs:`), whose Arrow cache is the standard
HF_DATASETS_CACHE. Reading the snapshot rather than asking `datasets` for the id is what makes a cached dataset
load with HF_HUB_OFFLINE=1: offline, `datasets` only finds ids it has converted before.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from imtune.errors import ImtuneError, InputError
from imtune.inputs import file_digest, stat_input

HUB_DATA_FILES = ["README.md", "*.parquet", "*.arrow", "*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz", "*.ndjson",
                  "*.csv", "*.csv.gz"]
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `save_to_disk` writes


def open_raw(spec) -> tuple:
    """(a function returning the datasets.Dataset, name for messages, identity for the fingerprint) of a Hub id or
    local directory. The identity is known before anything is parsed: a Hub snapshot's commit, or the content hash
    of every file in a local directory (never time stamps, which `datasets`' own cache trusts), so a cached table
    is used without opening the dataset, and a directory is parsed afresh whenever its content changed."""
    local = Path(spec.path).expanduser()
    if spec.path.startswith("hf://") or stat_input(local) is None:
        repo = hub_repo_id(spec.path)
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
            raise ImtuneError(f"--data {spec.path}: not a Hub dataset id (expected ORG/NAME or hf://datasets/ORG/NAME)")
        snap = hub_snapshot(repo, spec.revision)
        name = _name(repo + (f"@{spec.revision}" if spec.revision else ""), spec)
        return lambda: _load_folder(snap, spec, name), name, ["hub", repo, snap.name, spec.config, spec.split]
    if spec.revision:
        raise ImtuneError(f"--data-revision applies to Hub dataset ids only, not to the directory {spec.path}")
    digest = folder_digest(local)
    if any((local / m).is_file() for m in SAVED_MARKERS):
        if spec.config:
            raise ImtuneError(f"--data-config does not apply to a dataset saved with save_to_disk ({local})")
        name = _name(str(local), spec)
        return _unchanged(local, digest, lambda: _load_saved(local, spec)), name, \
            ["disk", str(local.resolve()), digest, spec.split]
    name = _name(str(local), spec)
    return _unchanged(local, digest, lambda: _load_folder(local, spec, name, fresh=True)), name, \
        ["dir", str(local.resolve()), digest, spec.config, spec.split]


def folder_digest(folder: Path) -> str:
    """sha256 over the relative path and content hash of every file under `folder` (hidden ones, such as a
    `datasets` cache, aside): regular files only, so a FIFO or device among them is refused before it is opened."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(f for f in filenames if not f.startswith(".")):
            p = Path(dirpath) / f
            # the name's own bytes: a name that is not UTF-8 (os gives it as surrogates) is hashed, not refused
            h.update(os.fsencode(p.relative_to(folder)) + f"\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def _unchanged(folder: Path, digest: str, load):
    """`load`, then a check that the directory's content is what the fingerprint was computed from."""
    def loaded():
        ds = load()
        if folder_digest(folder) != digest:
            raise InputError(str(folder), "changed while it was being read; run again once nothing writes to it")
        return ds
    return loaded


def hub_repo_id(s: str) -> str:
    for prefix in ("hf://datasets/", "hf://"):
        if s.startswith(prefix):
            return s[len(prefix):].strip("/")
    return s


def _name(what: str, spec) -> str:
    return f"{what} (" + (f"config {spec.config}, " if spec.config else "") + f"split {spec.split})"


def _load_saved(path: Path, spec):
    from datasets import DatasetDict, load_from_disk

    try:
        obj = load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise ImtuneError(f"{path}: cannot read the saved dataset: {_first_line(e)}") from None
    if isinstance(obj, DatasetDict):
        if spec.split not in obj:
            raise ImtuneError(f"{path}: no split {spec.split!r} (it has: {', '.join(obj)}); use --data-split")
        obj = obj[spec.split]
    return obj


def _load_folder(folder: Path, spec, name: str, fresh: bool = False):
    import pyarrow as pa
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        # fresh: parse the files again rather than trust `datasets`' cache of them (keyed by their time stamps)
        return load_dataset(str(folder), name=spec.config, split=spec.split,
                            download_mode="force_redownload" if fresh else None)
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
