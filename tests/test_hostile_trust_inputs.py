"""One input-trust rule for every file imtune reads (issue 23): content fingerprints that restored time stamps cannot
fool, nothing cached from a file that changed while it was read, regular files only, bounded size and nesting, and
one line + exit 2 for anything else. The hostile cases are written here (FIFOs, devices and edits cannot live in
git); tests/test_hostile_inputs.py keeps the data-file cases that can."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imtune.cli.main import main
from imtune.errors import ImtuneError, InputError

ROOT = Path(__file__).resolve().parents[1]


def rows(n: int, tag: str = "a") -> bytes:
    return "".join(json.dumps({"id": f"{tag}{i}", "messages": [{"role": "user", "content": f"question {tag}{i}"},
                                                                {"role": "assistant", "content": f"answer {tag}{i}"}]})
                   + "\n" for i in range(n)).encode()


def entries(cache: Path) -> list[Path]:
    """Committed cache entries (a build in progress is a hidden temp directory)."""
    return [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.exists() else []


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTUNE_CACHE", str(tmp_path / "imtune_cache"))
    return tmp_path / "tables"


def _edit_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Change bytes without changing the size, inode or time stamps (what a hostile tester did with `touch -r`)."""
    st = os.stat(path)
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    with open(path, "r+b") as f:  # same inode
        f.write(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


# ---- data files: the content decides --------------------------------------------------------------------------------

def test_an_in_place_edit_with_restored_times_is_read_again(tmp_path, cache):
    from imtune.records.sources import DataSpec, conversation_table

    path = tmp_path / "d.jsonl"
    path.write_bytes(rows(5))
    os.utime(path, (1e9, 1e9))  # old: nothing about its age makes it special
    t1 = conversation_table(DataSpec(str(path)), cache_dir=cache)
    assert conversation_table(DataSpec(str(path)), cache_dir=cache).fingerprint == t1.fingerprint  # a real hit
    _edit_in_place(path, b"answer a3", b"ANSWER a3")
    t2 = conversation_table(DataSpec(str(path)), cache_dir=cache)
    assert t2.fingerprint != t1.fingerprint  # the encode cache is keyed by this: it misses too
    assert [m.content for c in t2.conversations() for m in c.messages if m.role == "assistant"][3] == "ANSWER a3"
    _edit_in_place(path, b"ANSWER a3", b"answer a3")  # edited back: the first table is the right one again
    assert conversation_table(DataSpec(str(path)), cache_dir=cache).fingerprint == t1.fingerprint


def test_the_in_memory_loader_fingerprints_the_content(tmp_path, cache):
    from imtune.records.loading import load_dataset

    path = tmp_path / "d.jsonl"
    path.write_bytes(rows(3))
    r1 = load_dataset(path)
    _edit_in_place(path, b"answer a1", b"answer b1")
    r2 = load_dataset(path)
    assert r2.fingerprint != r1.fingerprint and r2.records[1].messages[1].content == "answer b1"


def test_an_in_place_edit_reaches_the_encoded_examples(tmp_path, cache, tiny_tok):
    from imtune.masking.encode_cache import encode_cached
    from imtune.masking.encoding import EncodeSettings
    from imtune.records.sources import DataSpec, conversation_table

    path = tmp_path / "d.jsonl"
    path.write_bytes(rows(4))
    settings = EncodeSettings.of(tiny_tok, template="chatml", max_length=64)

    def encoded_ids():
        t = conversation_table(DataSpec(str(path)), cache_dir=cache)
        c = encode_cached(t.dataset, t.fingerprint, t.name, tiny_tok, settings, root=tmp_path / "enc", num_proc=1)
        return c, [list(c.dataset[i]["input_ids"]) for i in range(len(c.dataset))]

    c1, ids1 = encoded_ids()
    _edit_in_place(path, b"answer a2", b"zzzzzz a2")
    c2, ids2 = encoded_ids()
    assert not c2.hit and ids2[2] != ids1[2] and ids2[:2] == ids1[:2]


@pytest.mark.parametrize("change", ["append", "rewrite_same_size"])
@pytest.mark.parametrize("loader", ["table", "memory"])
def test_a_file_changed_while_it_is_read_is_refused_and_nothing_cached(tmp_path, cache, monkeypatch, change, loader):
    """The file changes after its first record is parsed (a reader hook: deterministic); the read is refused, one
    line naming the file, and no table is committed under any fingerprint."""
    from imtune.records import parsing
    from imtune.records.loading import load_dataset
    from imtune.records.sources import DataSpec, conversation_table

    path = tmp_path / "d.jsonl"
    path.write_bytes(rows(6))
    real, calls = parsing._record, []

    def record_then_change(*a, **k):
        if not calls:
            if change == "append":
                with open(path, "ab") as f:
                    f.write(rows(3, tag="late"))
            else:
                _edit_in_place(path, b"answer a5", b"answer z5")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(parsing, "_record", record_then_change)
    with pytest.raises(InputError, match="changed while it was being read") as e:
        if loader == "table":
            conversation_table(DataSpec(str(path)), cache_dir=cache)
        else:
            load_dataset(path)
    assert e.value.path == str(path) and "\n" not in str(e.value)
    assert entries(cache) == []
    monkeypatch.setattr(parsing, "_record", real)  # the file is complete now: read whole, and cached
    t = conversation_table(DataSpec(str(path)), cache_dir=cache)
    assert len(t.dataset) == (9 if change == "append" else 6) and len(entries(cache)) == 1


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_whole_file_formats_are_read_once_through_the_hash(tmp_path, cache, suffix, monkeypatch):
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from imtune.records.sources import DataSpec, conversation_table, file_fingerprint

    recs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(recs))
    elif suffix == ".csv":
        path.write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(4)))
    else:
        pq.write_table(pa.Table.from_pylist(recs), path)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    t = conversation_table(DataSpec(str(path)), cache_dir=cache)
    assert opened.count(str(path)) == 1  # parsed and hashed in one read
    assert t.fingerprint == file_fingerprint(path, hashlib.sha256(path.read_bytes()).hexdigest(), None)
    assert len(t.dataset) == 4


@pytest.mark.parametrize("text, reason, record", [
    ("prompt,completion\np0,c0\np1,c1,EXTRA\n", "row has 3 fields, the header has 2", 1),
    ("prompt,completion\np0,c0\np1\n", "row has 1 fields, the header has 2", 1),
    ('prompt,completion\n"p0","c0","c0 again"\n', "row has 3 fields, the header has 2", 0),
])
def test_a_csv_row_with_a_field_count_unlike_its_header_is_refused(tmp_path, text, reason, record, tiny_dir, capsys):
    path = tmp_path / "d.csv"
    path.write_text(text)
    assert main(["inspect", "--model", str(tiny_dir), "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"imtune inspect: error: {path}: record {record}: {reason}"
    if record:  # with --skip-invalid the bad row is skipped and said so; the good one is used
        assert main(["inspect", "--model", str(tiny_dir), "--data", str(path), "--skip-invalid"]) == 0
        assert f"1x {reason} (record {record})" in capsys.readouterr().err


@pytest.mark.parametrize("make, reason", [
    (lambda p: Path("/dev/zero"), "is a device, not a regular file"),
    (lambda p: (os.mkfifo(p / "fifo.jsonl"), p / "fifo.jsonl")[1], "is a FIFO (named pipe), not a regular file"),
    (lambda p: (p / "dir.jsonl").mkdir() or p / "dir.jsonl", None),  # a directory is a dataset directory
    (lambda p: ((p / "f.jsonl").write_text(""), p / "f.jsonl" / "x.jsonl")[1],
     "not found (a part of the path is a file, not a directory)"),
])
def test_data_that_is_no_regular_file_is_refused_before_it_is_opened(tmp_path, make, reason, tiny_dir, capsys):
    path = make(tmp_path)
    if reason is None:
        (tmp_path / "dir.jsonl" / "x").write_text("")
    assert main(["inspect", "--model", str(tiny_dir), "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err, err
    if reason:
        assert err.endswith(reason), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches any directory regardless of its mode")
def test_a_file_in_a_directory_that_cannot_be_searched(tmp_path, tiny_dir, capsys):
    d = tmp_path / "locked"
    d.mkdir()
    (d / "d.jsonl").write_bytes(rows(2))
    d.chmod(0o600)  # readable, not searchable
    try:
        assert main(["inspect", "--model", str(tiny_dir), "--data", str(d / "d.jsonl")]) == 2
    finally:
        d.chmod(0o700)
    assert "permission denied (a directory on its path cannot be searched)" in capsys.readouterr().err


# ---- every numeric flag, through the real command line --------------------------------------------------------------

BIG = str(2**32)
# command (with what it needs to get past argument parsing) -> {flag: bad values}
NUMERIC_FLAGS = {
    "train --data d.jsonl --out o": {
        "--seed": ["-1", BIG, "1.5", "abc"], "--lr": ["nan", "0", "-1e-5", "inf"], "--epochs": ["0", "-2"],
        "--max-length": ["1"], "--micro-batch-size": ["0"], "--val-fraction": ["1", "-0.1", "nan"],
        "--warmup-ratio": ["1"], "--max-grad-norm": ["-1"], "--kl-coef": ["inf"], "--neftune-alpha": ["-5"],
        "--num-proc": ["0"], "--save-steps": ["-1"], "--save-total-limit": ["-1"], "--lora-r": ["0"],
        "--max-steps": ["0"], "--global-batch-size": ["0"], "--logging-steps": ["0"], "--adam-beta2": ["1"],
        "--loss-chunk-size": ["0"], "--gradient-accumulation-steps": ["0"], "--lora-alpha": ["0"]},
    "compare --data d.jsonl --out o": {
        "--seed": ["-1", BIG], "--seeds": ["0"], "--memorisation-n": ["-1", "0"], "--max-new-tokens": ["0"],
        "--val-fraction": ["0", "1", "nan"], "--n-train": ["0"], "--n-val": ["-3"], "--eval-limit": ["0"],
        "--eval-batch-size": ["0"]},
    "evaluate --tasks arc_easy": {
        "--temperature": ["nan", "-1", "inf"], "--code-timeout": ["nan", "0", "-1", "inf", "1e9"],
        "--seed": ["-1", BIG], "--max-new-tokens": ["0"], "--limit": ["0"], "--batch-size": ["0"],
        "--num-fewshot": ["-1"], "--n-samples": ["0"]},
    "generate --data d.jsonl": {
        "--max-new-tokens": ["0"], "--temperature": ["nan"], "--top-p": ["0", "1.5"], "--seed": ["-1"],
        "--n": ["0"], "--batch-size": ["0"]},
    "memorisation --data d.jsonl": {"--max-new-tokens": ["0"], "--n": ["-1"], "--batch-size": ["0"]},
    "inspect --data d.jsonl": {"--index": ["-1"], "--n": ["0"], "--max-length": ["1"]},
    "loss --data d.jsonl --model m": {"--max-length": ["0"]},
    "stats --data d.jsonl": {"--max-length": ["-5"]},
    "advise --data d.jsonl --pilot": {
        "--budget-min": ["0", "nan"], "--pilot-seeds": ["0"], "--pilot-heldout": ["0"], "--lr": ["0"],
        "--batch": ["0"], "--epochs": ["0"], "--n": ["0"]},
    "judge alpaca-eval --outputs o.json": {
        "--judge-timeout": ["0", "nan"], "--judge-deadline": ["-1"], "--judge-concurrency": ["0"],
        "--judge-max-retries": ["-1"], "--judge-max-tokens": ["0"], "--limit": ["0"]},
    "judge mt-bench --answers a.jsonl": {"--limit": ["0"], "--max-new-tokens": ["0"], "--batch-size": ["0"]},
}
CASES = [(cmd, f, v) for cmd, flags in NUMERIC_FLAGS.items() for f, vals in flags.items() for v in vals]


def cli(*argv, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "imtune.cli.main", *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_exit_2(r, *needles):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("cmd, flag, value", CASES, ids=[f"{c.split()[0]}{f}={v}" for c, f, v in CASES])
def test_a_numeric_flag_out_of_range_is_one_line_and_exit_2(cmd, flag, value, tmp_path):
    r = cli(*cmd.split(), f"{flag}={value}", cwd=tmp_path)
    err = one_line_exit_2(r, "error: ")
    assert flag.lstrip("-").replace("-", "_") in err.replace("-", "_"), err  # names the flag (or its field)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("text, needle", [
    ("seed: -1\n", "seed must be an integer in [0, 4294967295]"),
    (f"seed: {2**32}\n", "seed must be an integer"),
    ("lr: .nan\n", "lr must be a finite number"),
    ("epochs: 0\n", "epochs must be an integer in [1, "),
])
def test_a_config_value_out_of_range_is_one_line(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text("data: d.jsonl\nout: o\n" + text)
    one_line_exit_2(cli("train", "c.yaml", cwd=tmp_path), needle)


# ---- YAML configs ---------------------------------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("make, needle", [
    (lambda d: (d / "c.yaml").write_bytes(b"data: d.jsonl\nout: \xff\xfe\n"), "not valid UTF-8"),
    (lambda d: (d / "c.yaml").write_text(BOMB), "alias *a (anchors and aliases are not allowed)"),
    (lambda d: (d / "c.yaml").write_text("lr: 1e-5\nepochs: 2\nlr: 1e-3\n"), "c.yaml:3: malformed YAML: duplicate "
                                                                            "key 'lr'"),
    (lambda d: (d / "c.yaml").write_text("a:\n  b:\n    lr: 1\n    lr: 2\n"), "duplicate key 'lr'"),
    (lambda d: (d / "c.yaml").write_text("x: " + "[" * 5000 + "]" * 5000 + "\n"), "nested too deeply"),
    (lambda d: (d / "c.yaml").write_text("x: " + "{a: " * 150 + "1" + "}" * 150 + "\n"), "nested too deeply"),
    (lambda d: (d / "c.yaml").write_text("# " + "x" * (5 << 20) + "\n"), "too large"),
    (lambda d: (d / "c.yaml").write_text("- lr\n- 1\n"), "expected a mapping of option: value, got list"),
    (lambda d: (d / "c.yaml").write_text("lr: [1, 2\n"), "malformed YAML"),
    (lambda d: (d / "c.yaml").write_text("lr: !!python/object/apply:os.system [echo hi]\n"), "malformed YAML"),
    (lambda d: (d / "c.yaml").write_text("lr: 1e-5\n", encoding="utf-16"), "not valid UTF-8"),
    (lambda d: (d / "c.yaml").write_text("? [a, b]\n: 1\n"), "found unhashable key"),
    (lambda d: (d / "c.yaml").mkdir(), "is a directory"),
    (lambda d: os.mkfifo(d / "c.yaml"), "is a FIFO (named pipe), not a regular file"),
    (lambda d: (d / "c.yaml").symlink_to("/dev/zero"), "is a device, not a regular file"),
])
def test_a_hostile_config_is_one_line_and_exit_2(tmp_path, make, needle):
    make(tmp_path)
    r = cli("train", "c.yaml", "--data", "d.jsonl", "--out", "o", cwd=tmp_path, timeout=60)
    one_line_exit_2(r, "c.yaml", needle)


# ---- checkpoints on --resume ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A finished 2-step run with a checkpoint after each step; tests corrupt copies of it."""
    import imtune

    d = tmp_path_factory.mktemp("resume")
    (d / "d.jsonl").write_bytes(rows(8))
    cfg = dict(model=str(tiny_dir), data=str(d / "d.jsonl"), out=str(d / "run"), template="chatml", max_length=48,
               micro_batch_size=2, gradient_accumulation_steps=2, epochs=1, save_steps=1, save_total_limit=0,
               progress=False, report_to=["none"], seed=3)
    imtune.train(cfg)
    return cfg


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("name, damage, needle", [
    ("weights.safetensors", _truncate, "unreadable checkpoint weights"),
    ("weights.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "unreadable checkpoint weights"),
    ("optimizer.pt", _truncate, "unreadable optimizer state"),
    ("optimizer.pt", lambda p: p.write_bytes(b"not a torch file"), "unreadable optimizer state"),
    ("scheduler.pt", lambda p: p.write_bytes(b""), "unreadable scheduler state"),
    ("rng_state_0.pt", _truncate, "unreadable RNG state"),
    ("trainer_state.json", lambda p: p.write_bytes(b'{"global_step": 1,'), "malformed JSON"),
    ("trainer_state.json", lambda p: p.write_bytes(b'{"global_step": \xff}'), "not valid UTF-8"),
    ("optimizer.pt", lambda p: (p.unlink(), os.mkfifo(p)), "is a FIFO (named pipe), not a regular file"),
])
def test_a_damaged_checkpoint_on_resume_is_one_line_naming_the_file(trained, tmp_path, name, damage, needle,
                                                                    capsys):
    import shutil

    import yaml

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    ckpt = out / "checkpoints" / "checkpoint-000001"
    assert (ckpt / name).exists(), sorted(p.name for p in ckpt.iterdir())
    damage(ckpt / name)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**trained, "out": str(out)}))
    assert main(["train", str(cfg), "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]  # the others are progress notes
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"imtune train: error: {ckpt / name}") and needle in errors[0], err


# ---- every non-data JSON input x every hostile file -------------------------------------------------------------------

def _fn(name):
    def call(path, tmp):
        if name == "outputs":
            from imtune.evaluation.judge.alpaca_eval import load_model_outputs as f
        elif name == "answers":
            from imtune.evaluation.judge.mt_bench import load_answers as f
        elif name == "evidence":
            from imtune.analysis.advise import evidence_rows

            def f(p):
                return evidence_rows([p])
        elif name == "table":
            from imtune.analysis.advise import load_table as f
        elif name == "trainer_state":
            from imtune.training.checkpointing import read_state

            def f(p):
                return read_state(Path(p).parent)
        return f(str(path))
    return call


def _compare(path, tmp):
    (tmp / "d.jsonl").write_bytes(rows(12))
    return ["compare", "--data", str(tmp / "d.jsonl"), "--out", str(tmp / "cmp"), "--model", "x"]


# kind -> (where the hostile file goes, relative to tmp; a function raising InputError, or the argv that reads it)
JSON_INPUTS = {
    "judge outputs": ("outputs.json", _fn("outputs")),
    "MT-Bench answers": ("answers.jsonl", _fn("answers")),
    "--evidence": ("results.json", _fn("evidence")),
    "--table": ("study.json", _fn("table")),
    "trainer_state.json": ("ckpt/trainer_state.json", _fn("trainer_state")),
    "--samples": ("samples.jsonl", lambda p, tmp: ["evaluate", "--tasks", "humaneval", "--samples", str(p)]),
    "plot rows": ("loss.jsonl", lambda p, tmp: ["plot", str(p), "--out", str(tmp / "fig")]),
    "--generations": ("gen.jsonl", lambda p, tmp: ["memorisation", "--generations", str(p), "--out",
                                                    str(tmp / "mem")]),
    "compare split.json": ("cmp/data/split.json", _compare),
}


def _sparse(p: Path, size: int) -> None:
    with open(p, "wb") as f:
        f.truncate(size)


# case -> (make the file at p, what the one line says; None: any reason, as long as it names the file)
HOSTILE = {
    "invalid-utf8": (lambda p: p.write_bytes(b'{"output": "caf\xe9"}\n'), "not valid UTF-8"),
    "deep-nesting": (lambda p: p.write_text("[" * 5000 + "]" * 5000 + "\n"), "nested too deeply"),
    "nesting-150": (lambda p: p.write_text("[" * 150 + "]" * 150 + "\n"), "nested too deeply"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "dev-zero": (lambda p: p.symlink_to("/dev/zero"), "is a device, not a regular file"),
    "fifo": (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
    "huge": (lambda p: _sparse(p, (512 << 20) + 1), "too large"),
    "wrong-shape": (lambda p: p.write_text("42\n"), None),
    "wrong-record-shape": (lambda p: p.write_text('[[1, 2], "x"]\n'), None),
    "duplicate-key": (lambda p: p.write_text('{"output": "a", "output": "b"}\n'), "duplicate key 'output'"),
    "truncated": (lambda p: p.write_text('{"output": "a", \n'), "malformed JSON"),
    "empty": (lambda p: p.write_text(""), None),
    "huge-int": (lambda p: p.write_text('{"n": ' + "9" * 5000 + "}\n"), "integer with 5000 digits"),
}
JSON_CASES = [(k, c) for k in JSON_INPUTS for c in HOSTILE]


@pytest.mark.parametrize("kind, case", JSON_CASES, ids=[f"{k}-{c}" for k, c in JSON_CASES])
def test_a_hostile_json_input_is_one_line_naming_it(kind, case, tmp_path, capsys):
    where, reader = JSON_INPUTS[kind]
    make, needle = HOSTILE[case]
    p = tmp_path / where
    p.parent.mkdir(parents=True, exist_ok=True)
    argv = reader(p, tmp_path) if reader.__name__ in ("_compare", "<lambda>") else None
    make(p)
    if argv is None:  # the reader itself (its command needs a model, a judge server or a run first)
        with pytest.raises(ImtuneError) as e:
            reader(p, tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(p)), msg
    elif case == "fifo":  # a real process: if the FIFO were opened, the read would block and the timeout say so
        msg = one_line_exit_2(cli(*argv, cwd=tmp_path, timeout=120), str(p))
    else:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        msg = err.splitlines()[-1]
        assert "Traceback" not in err and [line for line in err.splitlines() if "error:" in line] == [msg], err
        assert "error: " + str(p) in msg, msg
    if needle:
        assert needle in msg, msg


def test_a_corrupt_compare_done_marker_is_one_line(tmp_path):
    from imtune.analysis.compare import _run_done

    (tmp_path / "compare_done.json").write_bytes(b'{"config": "abc"')
    with pytest.raises(InputError, match=r"compare_done.json:1: malformed JSON"):
        _run_done(tmp_path, None)


# ---- models that need their own code -----------------------------------------------------------------------------------

def _model_with_auto_map(tmp_path, tiny_dir, model_type):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    cfg["model_type"] = model_type or cfg["model_type"]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    return d


def test_a_model_that_needs_remote_code_is_one_line(tmp_path, tiny_dir, capsys):
    d = _model_with_auto_map(tmp_path, tiny_dir, "imtune_custom")
    (tmp_path / "d.jsonl").write_bytes(rows(2))
    assert main(["generate", "--model", str(d), "--data", str(tmp_path / "d.jsonl"), "--out",
                 str(tmp_path / "g.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{d / 'config.json'}: the model needs its own Python code" in err and "--trust-remote-code" in err


def test_an_auto_map_of_a_known_model_type_loads_without_running_it(tmp_path, tiny_dir):
    from imtune.models import load_model

    assert load_model(_model_with_auto_map(tmp_path, tiny_dir, None)) is not None


# ---- the ranges themselves --------------------------------------------------------------------------------------------

def test_a_range_accepts_exactly_its_values():
    from hypothesis import given
    from hypothesis import strategies as st

    from imtune import ranges

    @given(st.integers(min_value=-(2**70), max_value=2**70))
    def seeds(v):
        ok = 0 <= v < 2**32
        assert ranges.SEED.contains(v) == ok
        if ok:
            assert ranges.SEED(str(v)) == v
        else:
            with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer in \[0, 4294967295\]"):
                ranges.SEED(str(v))

    @given(st.floats(allow_nan=True, allow_infinity=True))
    def timeouts(v):
        ok = v == v and 0 < v <= ranges.TIMEOUT_MAX_S
        assert ranges.TIMEOUT_S.contains(v) == ok
        assert (ranges.TIMEOUT_S(repr(v)) == v) if ok else pytest.raises(argparse.ArgumentTypeError,
                                                                          ranges.TIMEOUT_S, repr(v))

    seeds()
    timeouts()
    assert ranges.COUNT.contains(1) and not ranges.COUNT.contains(True) and not ranges.COUNT.contains(1.0)


# ---- dataset directories: the same rule for every file in them ------------------------------------------------------

def test_a_dataset_directory_edited_in_place_is_read_again(tmp_path, cache):
    from imtune.records.sources import DataSpec, conversation_table

    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_bytes(rows(4))
    os.utime(d / "train.jsonl", (1e9, 1e9))
    t1 = conversation_table(DataSpec(str(d)), cache_dir=cache)
    assert conversation_table(DataSpec(str(d)), cache_dir=cache).fingerprint == t1.fingerprint
    _edit_in_place(d / "train.jsonl", b"answer a2", b"ANSWER a2")  # `datasets`' own cache would trust the mtime
    t2 = conversation_table(DataSpec(str(d)), cache_dir=cache)
    assert t2.fingerprint != t1.fingerprint
    assert [c.messages[1].content for c in t2.conversations()][2] == "ANSWER a2"


def test_a_fifo_in_a_dataset_directory_is_refused_before_it_is_opened(tmp_path, cache):
    from imtune.records.sources import DataSpec, conversation_table

    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_bytes(rows(2))
    os.mkfifo(d / "more.jsonl")
    with pytest.raises(InputError, match=r"more.jsonl: is a FIFO \(named pipe\), not a regular file"):
        conversation_table(DataSpec(str(d)), cache_dir=cache)
