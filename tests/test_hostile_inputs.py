"""Hostile data files (issue 8 §6): each gives one line naming file + line/record + reason and exit code 2, with and
without --skip-invalid; where there is a bad record, --skip-invalid skips it and says so. The files are kept in
tests/hostile/inputs/; the ones git cannot hold (FIFO, symlinks) are made here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imtune.cli.main import main

INPUTS = Path(__file__).resolve().parent / "hostile" / "inputs"

# file -> (where the bad record is, or None when the whole file is bad; reason); None: the file is fine.
CASES = {
    "nested.jsonl": (":2", "JSON nested too deeply"),
    "nested.json": (None, "JSON nested too deeply"),
    "bigint.jsonl": (":2", "integer with 5000 digits"),
    "bigint.json": (": record 1", "integer with 5000 digits"),
    "surrogate.jsonl": (":2", "lone surrogate '\\ud800'"),
    "surrogate.json": (": record 1", "lone surrogate '\\ud800'"),
    "duplicate_keys.jsonl": (":2", "duplicate key 'completion'"),
    "duplicate_keys.json": (": record 1", "duplicate key 'content'"),
    "symlink_loop.jsonl": (None, "symlink loop"),
    "broken_link.jsonl": (None, "broken symlink"),
    "fifo.jsonl": (None, "is a FIFO (named pipe), not a regular file"),
    "unreadable.jsonl": (None, "cannot read the file: Input/output error"),
    # csv's 131,072-character field limit is no property of the data: a long response loads.
    "long_field.csv": None,
}


def _make(name: str, tmp_path: Path) -> Path:
    if (INPUTS / name).exists():
        return INPUTS / name
    p = tmp_path / name
    if name == "symlink_loop.jsonl":
        (tmp_path / "other.jsonl").symlink_to(p)
        p.symlink_to(tmp_path / "other.jsonl")
    elif name == "broken_link.jsonl":
        p.symlink_to(tmp_path / "gone.jsonl")
    elif name == "fifo.jsonl":
        os.mkfifo(p)  # opening it for reading would block until a writer came: never
    elif name == "unreadable.jsonl":
        # A regular file whose read fails, even for root: /proc/self/mem at offset 0 is unmapped memory.
        p.symlink_to("/proc/self/mem")
    return p


@pytest.mark.parametrize("skip", [False, True], ids=["stop", "skip-invalid"])
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, skip, tmp_path, tiny_dir, capsys):
    p = _make(name, tmp_path)
    rc = main(["inspect", "--model", str(tiny_dir), "--data", str(p), "--format", "json"]
              + (["--skip-invalid"] if skip else []))
    err = capsys.readouterr().err.strip()
    if CASES[name] is None:
        assert rc == 0 and "error" not in err, err
        return
    where, reason = CASES[name]
    if skip and where is not None:  # the bad record is skipped and reported; the good ones are used
        assert rc == 0, err
        place = f"line {where[1:]}" if where.startswith(":") and where[1:].isdigit() else where[2:]
        assert err.startswith(f"skipped 1 invalid record(s) in {p}: 1x ") and reason in err, err
        assert err.endswith(f" ({place})"), err
        return
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("imtune inspect: error: ") and str(p) in err and reason in err, err
    if where is not None:
        assert f"{p}{where}: " in err
    assert "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file regardless of its mode")
def test_permission_denied(tmp_path, tiny_dir, capsys):
    p = tmp_path / "secret.jsonl"
    p.write_text("{}\n")
    p.chmod(0)
    assert main(["inspect", "--model", str(tiny_dir), "--data", str(p)]) == 2
    assert "cannot read the file: Permission denied" in capsys.readouterr().err
