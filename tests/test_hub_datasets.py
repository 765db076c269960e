"""Datasets by Hugging Face Hub id, dataset directory or file as one canonical Arrow table, with no network.

Hub datasets are laid out exactly as huggingface_hub caches them (blobs named by content hash, snapshot entries as
relative symlinks, refs/main) under a temporary HF_HOME, and every command runs as a user would run it: a fresh
process with HF_HOME / HF_HUB_OFFLINE / HF_TOKEN set before anything imports huggingface_hub."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tiny import run_in_hf_home

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_imtuneDatasetSecret0123456789"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def put_dataset(hf_home: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT_A,
                ref: str | None = "main") -> Path:
    """Lay `files` (path in the repo -> bytes) out as huggingface_hub's cache does for dataset `repo_id`."""
    repo = Path(hf_home) / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def tulu_rows(n: int, bad: int | None = None, tag: str = "") -> list[dict]:
    """Tulu-v2's schema: {dataset, id, messages: [{role, content}]}; row `bad` has an empty reply."""
    return [{"dataset": "oasst", "id": f"{tag}t{i}",
             "messages": [{"role": "user", "content": f"{tag}question {i}"},
                          {"role": "assistant", "content": "" if i == bad else f"{tag}answer {i}"}]}
            for i in range(n)]


def _run(args, hf_home, offline=True, **env):
    return run_in_hf_home(args, hf_home, SECRET, offline, **env)


def _cli(args, hf_home, **env):
    return _run(["-m", "imtune.cli.main", *args], hf_home, **env)


def _py(code: str, hf_home) -> dict:
    """Run `code` (which sets `out`) in a fresh offline process; return `out`."""
    r = _run(["-c", "import json\n" + code + "\nprint(json.dumps(out))"], hf_home)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _one_line_error(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and SECRET not in r.stderr + r.stdout
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def hf_home(tmp_path):
    home = tmp_path / "hf"
    put_dataset(home, "org/tulu-mini", {"data/train-00000-of-00001.parquet": parquet(tulu_rows(6))})
    return home


# ---- commands by Hub id, offline ------------------------------------------------------------------------------------

def test_inspect_and_stats_by_hub_id_offline(hf_home, tiny_dir):
    r = _cli(["inspect", "--data", "org/tulu-mini", "--model", str(tiny_dir), "--format", "json", "--index", "2",
              "--template", "chatml"], hf_home)
    assert r.returncode == 0, r.stderr
    text = "".join(t["text"] if isinstance(t, dict) and "text" in t else "" for t in _tokens(json.loads(r.stdout)))
    assert "question 2" in text and "answer 2" in text
    r = _cli(["stats", "--data", "hf://datasets/org/tulu-mini", "--model", str(tiny_dir), "--json"], hf_home)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["examples"] == 6 and s["data"] == "hf://datasets/org/tulu-mini"
    assert (hf_home / "datasets").is_dir()  # the datasets library's own Arrow cache, under HF_HOME


def _tokens(doc):
    """The per-token rows of `inspect --format json`, whatever the nesting."""
    if isinstance(doc, list):
        for d in doc:
            yield from _tokens(d)
    elif isinstance(doc, dict):
        if "text" in doc:
            yield doc
        for v in doc.values():
            if isinstance(v, (list, dict)):
                yield from _tokens(v)


# ---- split, config, revision; schemas ----------------------------------------------------------------------------------

CARD = b"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: alt
  data_files:
  - split: train
    path: alt/train-*.parquet
---
# a dataset card
"""


def test_split_config_and_revision(tmp_path):
    home = tmp_path / "hf"
    put_dataset(home, "org/multi", {"README.md": CARD,
                                    "data/train-00000-of-00001.parquet": parquet(tulu_rows(3, tag="old-")),
                                    "data/test-00000-of-00001.parquet": parquet(tulu_rows(2, tag="old-test-")),
                                    "alt/train-0.parquet": parquet(tulu_rows(4, tag="old-alt-"))}, commit=COMMIT_A, ref=None)
    put_dataset(home, "org/multi", {"README.md": CARD,
                                    "data/train-00000-of-00001.parquet": parquet(tulu_rows(5, tag="new-")),
                                    "data/test-00000-of-00001.parquet": parquet(tulu_rows(1, tag="new-test-")),
                                    "alt/train-0.parquet": parquet(tulu_rows(7, tag="new-alt-"))}, commit=COMMIT_B)
    out = _py(f"""
from imtune.records.loading import load_dataset
from imtune.records.sources import DataSpec, conversation_table
def first(**kw):
    r = load_dataset('org/multi', **kw).records
    return [len(r), r[0].messages[0].content, r[0].source]
out = {{"main": first(), "test": first(split="test"), "alt": first(config="alt"),
       "hf": load_dataset('hf://org/multi').records == load_dataset('org/multi').records,
       "old": first(revision="{COMMIT_A}"), "old_alt": first(revision="{COMMIT_A}", config="alt"),
       "fp": [conversation_table(DataSpec('org/multi', **kw)).fingerprint
              for kw in ({{}}, {{}}, {{"split": "test"}}, {{"revision": "{COMMIT_A}"}})]}}
""", home)
    assert out["main"] == [5, "new-question 0", "org/multi (split train): record 0"]
    assert out["hf"] and out["test"][:2] == [1, "new-test-question 0"]
    assert out["alt"][:2] == [7, "new-alt-question 0"]
    assert out["alt"][2] == "org/multi (config alt, split train): record 0"
    assert out["old"][:2] == [3, "old-question 0"] and out["old"][2].startswith(f"org/multi@{COMMIT_A} (split")
    assert out["old_alt"][:2] == [4, "old-alt-question 0"]
    fp = out["fp"]
    assert fp[0] == fp[1] and len(set(fp)) == 3  # stable for the same content; another split or commit differs


def test_unknown_split_and_config_are_one_line(hf_home, tiny_dir):
    r = _cli(["stats", "--data", "org/tulu-mini", "--data-split", "validation", "--model", str(tiny_dir)], hf_home)
    _one_line_error(r, "org/tulu-mini (split validation)", "validation")
    r = _cli(["stats", "--data", "org/tulu-mini", "--data-config", "nope", "--model", str(tiny_dir)], hf_home)
    _one_line_error(r, "org/tulu-mini (config nope, split train)", "nope")


def test_sharegpt_alpaca_and_prompt_completion_columns_detected(tmp_path):
    home = tmp_path / "hf"
    share = [{"id": i, "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": f"q{i}"},
                                         {"from": "gpt", "value": f"a{i}"}]} for i in range(3)]
    alpaca = [{"instruction": f"do {i}", "input": "" if i else "with this", "output": f"done {i}"} for i in range(3)]
    pc = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(2)]
    put_dataset(home, "org/share", {"data/train-00000-of-00001.parquet": parquet(share)})
    put_dataset(home, "org/alpaca", {"train.jsonl": jsonl(alpaca)})
    put_dataset(home, "org/pc", {"data/train.csv": b"prompt,completion\n" + b"".join(
        f"{r['prompt']},{r['completion']}\n".encode() for r in pc)})
    out = _py("""
from imtune.records.loading import load_records
out = {n: [[(m.role, m.content) for m in c.messages] + [c.id] for c in load_records('org/' + n)]
       for n in ('share', 'alpaca', 'pc')}
""", home)
    assert out["share"][1] == [["system", "be brief"], ["user", "q1"], ["assistant", "a1"], "1"]
    assert out["alpaca"][0] == [["user", "do 0\n\nwith this"], ["assistant", "done 0"], "0"]
    assert out["alpaca"][2] == [["user", "do 2"], ["assistant", "done 2"], "2"]
    assert out["pc"] == [[["user", "p0"], ["assistant", "c0"], "0"], [["user", "p1"], ["assistant", "c1"], "1"]]


def test_unknown_columns_are_one_line(tmp_path, tiny_dir):
    home = tmp_path / "hf"
    put_dataset(home, "org/odd", {"data/train.parquet": parquet([{"text": "x", "label": 1}])})
    r = _cli(["stats", "--data", "org/odd", "--model", str(tiny_dir)], home)
    _one_line_error(r, "org/odd (split train)", "cannot tell the schema", "'text'")


# ---- not cached, bad rows -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offline", [True, False])
def test_uncached_id_is_one_line_exit_2(tmp_path, tiny_dir, offline):
    env = {} if offline else {"HF_ENDPOINT": "http://127.0.0.1:9"}  # online: a closed loopback port
    r = _run(["-m", "imtune.cli.main", "inspect", "--data", "some-org/not-cached", "--model", str(tiny_dir)],
             tmp_path / "empty-hf", offline=offline, **env)
    line = _one_line_error(r, "dataset some-org/not-cached is not in the Hugging Face cache")
    assert ("HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached") in line


def test_missing_file_with_a_data_suffix_is_still_a_missing_file(tmp_path, tiny_dir):
    r = _cli(["stats", "--data", "nodir/train.jsonl", "--model", str(tiny_dir)], tmp_path / "hf")
    _one_line_error(r, "nodir/train.jsonl: file not found")


def test_input_error_survives_pickling():
    from imtune.errors import InputError

    for e in (InputError("org/x (split train)", "message 1: empty content", record=7),
              InputError("d.jsonl", "malformed JSON", line=3), InputError("d.csv", "no valid records")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is InputError and str(back) == str(e)
        assert (back.path, back.reason, back.line, back.record) == (e.path, e.reason, e.line, e.record)


def test_bad_row_in_a_worker_process_is_one_error(tmp_path):
    home = tmp_path / "hf"
    put_dataset(home, "org/bad", {"data/train-00000-of-00001.parquet": parquet(tulu_rows(40, bad=29))})
    out = _py("""
from imtune.errors import InputError
from imtune.records.sources import DataSpec, conversation_table
try:
    conversation_table(DataSpec('org/bad'), num_proc=2)
    out = {"raised": None}
except InputError as e:
    out = {"raised": [type(e).__name__, str(e), e.record]}
t = conversation_table(DataSpec('org/bad'), num_proc=2, skip_invalid=True)
out.update(skipped=t.skipped, n=len(t.dataset), rows=t.dataset['row'][28:30])
try:
    conversation_table(DataSpec('org/bad'), num_proc=2)  # the cached --skip-invalid table still stops here
except InputError as e:
    out["again"] = str(e)
""", home)
    assert out["raised"] == ["InputError", "org/bad (split train): record 29: message 1: empty content", 29]
    assert out["skipped"] == {"message 1: empty content": {"count": 1, "rows": [29]}}
    assert out["n"] == 39 and out["rows"] == [28, 30]
    assert out["again"] == out["raised"][1]


def test_bad_row_on_the_command_line_with_and_without_skip_invalid(tmp_path, tiny_dir):
    # 10,001 rows: enough that the default uses a worker process per core (where there are two or more cores).
    home = tmp_path / "hf"
    put_dataset(home, "org/big-bad", {"data/train-00000-of-00001.parquet": parquet(tulu_rows(10_001, bad=7_777))})
    r = _cli(["stats", "--data", "org/big-bad", "--model", str(tiny_dir), "--json"], home)
    _one_line_error(r, "org/big-bad (split train): record 7777: message 1: empty content")
    r = _cli(["stats", "--data", "org/big-bad", "--model", str(tiny_dir), "--json", "--skip-invalid"], home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["examples"] == 10_000
    assert "skipped 1 invalid record(s) in org/big-bad: 1x message 1: empty content (record 7777)" in r.stderr


@pytest.mark.slow
def test_tiny_train_by_hub_id_offline_skipping_bad_rows(tmp_path, tiny_dir):
    home = tmp_path / "hf"
    rows = tulu_rows(10, bad=2) + [{"dataset": "x", "id": "r", "messages": [{"role": "user", "content": "only q"}]}]
    rows[5]["messages"][1]["content"] = ""
    put_dataset(home, "org/some-bad", {"data/train-00000-of-00001.parquet": parquet(rows)})
    out = tmp_path / "run"
    r = _cli(["train", "--data", "org/some-bad", "--model", str(tiny_dir), "--out", str(out), "--max-steps", "2",
              "--micro-batch-size", "2", "--max-length", "64", "--template", "chatml", "--no-progress",
              "--skip-invalid", "--val-fraction", "0.25"], home)
    assert r.returncode == 0, r.stderr
    cfg = (out / "imtune_config.yaml").read_text()
    assert "data: org/some-bad" in cfg and "data_split: train" in cfg
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["data"]["train_examples"] + final["data"]["val_examples"] == 8
    line = ("skipped 3 invalid record(s) in org/some-bad: 2x message 1: empty content (record 2, record 5); "
            "1x conversation has no assistant turn (record 10)")
    assert line in r.stderr and line in final["data_notes"]


# ---- dataset directories ---------------------------------------------------------------------------------------------------

def test_saved_to_disk_directory(tmp_path, tiny_dir):
    from datasets import Dataset, DatasetDict

    one, two = tmp_path / "one", tmp_path / "two"
    Dataset.from_list(tulu_rows(3)).save_to_disk(str(one))
    DatasetDict({"train": Dataset.from_list(tulu_rows(4)),
                 "test": Dataset.from_list(tulu_rows(2, bad=1))}).save_to_disk(str(two))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    home = tmp_path / "hf"
    out = _py(f"""
from imtune.errors import ImtuneError
from imtune.records.loading import load_records
out = [len(load_records({str(one)!r})), len(load_records({str(two)!r})), load_records({str(two)!r})[0].source]
try:
    load_records({str(two)!r}, split="dev")
except ImtuneError as e:
    out.append(str(e))
""", home)
    assert out[:3] == [3, 4, f"{two} (split train): record 0"]
    assert "no split 'dev'" in out[3] and "train, test" in out[3]
    r = _cli(["stats", "--data", str(two), "--data-split", "test", "--model", str(tiny_dir), "--json"], home)
    _one_line_error(r, f"{two} (split test): record 1: message 1: empty content")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(home)) == before


def test_revision_is_for_hub_ids_only(tmp_path):
    from datasets import Dataset

    from imtune.errors import ImtuneError
    from imtune.records.sources import DataSpec, conversation_table

    Dataset.from_list(tulu_rows(2)).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ImtuneError, match="--data-revision applies to Hub dataset ids only"):
        conversation_table(DataSpec(str(tmp_path / "d"), revision="main"), cache_dir=tmp_path / "cache")


def test_data_spec_of_a_train_config():
    from imtune.config import TrainConfig
    from imtune.records.sources import DataSpec, is_hub_id

    cfg = TrainConfig(data="org/x", data_split="test", data_config="c", data_revision="v1", data_format="sharegpt")
    assert DataSpec.of(cfg) == DataSpec("org/x", "test", "c", "v1", "sharegpt")
    assert DataSpec.of(TrainConfig(data="a.jsonl")) == DataSpec("a.jsonl")
    assert is_hub_id("org/x") and is_hub_id("hf://datasets/org/x") and is_hub_id("hf://org/x")
    assert not is_hub_id("org/x.jsonl") and not is_hub_id("./x/y") and not is_hub_id("x")
    assert not is_hub_id(str(ROOT / "src"))  # an existing path is always a path


# ---- local files: the canonical table equals the in-memory records ------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _text})
_record = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(_message, min_size=1, max_size=4)},
                          optional={"id": st.one_of(_text, st.integers(0, 10**6))}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system"]), "value": _text}), min_size=1, max_size=4)}),
    st.fixed_dictionaries({"instruction": _text, "output": st.one_of(_text, st.just(""))}),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record, min_size=1, max_size=12))
def test_canonical_table_of_a_jsonl_equals_load_records(tmp_path_factory, records):
    from imtune.errors import InputError
    from imtune.records.loading import load_dataset
    from imtune.records.sources import DataSpec, conversation_table

    d = tmp_path_factory.mktemp("local")
    path = d / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    try:
        expected = load_dataset(path, skip_invalid=True)
    except InputError as e:  # every record invalid: the table says the same
        with pytest.raises(InputError, match="no valid records"):
            conversation_table(DataSpec(str(path)), skip_invalid=True, cache_dir=d / "cache")
        assert str(e).endswith("skipped)")
        return
    table = conversation_table(DataSpec(str(path)), skip_invalid=True, cache_dir=d / "cache")
    assert list(table.conversations()) == expected.records  # messages, ids and "file:line" sources
    assert [str(e) for e in table.skipped_errors()] == [str(e) for e in expected.skipped]
    assert sum(s["count"] for s in table.skipped.values()) == len(expected.skipped)
    if expected.skipped:
        with pytest.raises(InputError) as raised:
            conversation_table(DataSpec(str(path)), cache_dir=d / "cache")
        assert str(raised.value) == str(expected.skipped[0])


def test_local_table_is_cached_by_fingerprint_and_follows_the_content(tmp_path):
    from imtune.records.sources import DataSpec, conversation_table

    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(tulu_rows(3)))
    cache = tmp_path / "cache"
    t1 = conversation_table(DataSpec(str(path)), cache_dir=cache)
    t2 = conversation_table(DataSpec(str(path)), cache_dir=cache)
    assert t1.fingerprint == t2.fingerprint and t1.dataset.cache_files == t2.dataset.cache_files
    assert t1.dataset.features == t2.dataset.features and t1.dataset.column_names == ["id", "row", "messages"]
    mtime = (cache / t1.fingerprint / "table.arrow").stat().st_mtime_ns
    conversation_table(DataSpec(str(path)), cache_dir=cache)
    assert (cache / t1.fingerprint / "table.arrow").stat().st_mtime_ns == mtime  # not rebuilt
    assert conversation_table(DataSpec(str(path), format="messages"), cache_dir=cache).fingerprint != t1.fingerprint
    path.write_bytes(jsonl(tulu_rows(4)))
    t3 = conversation_table(DataSpec(str(path)), cache_dir=cache)
    assert t3.fingerprint != t1.fingerprint and len(t3.dataset) == 4


def test_a_remembered_digest_is_only_a_hint(tmp_path, monkeypatch):
    """The digest remembered per (path, inode, size, times) picks the table to check; the file's bytes decide."""
    import os

    from imtune.records.sources import DataSpec, conversation_table

    monkeypatch.setenv("IMTUNE_CACHE", str(tmp_path / "cache"))
    path, cache = tmp_path / "d.jsonl", tmp_path / "tables"
    path.write_bytes(jsonl(tulu_rows(3)))
    os.utime(path, (1e9, 1e9))
    t1 = conversation_table(DataSpec(str(path)), cache_dir=cache)
    (memo,) = (tmp_path / "cache").glob("digests/*")
    memo.write_text("f" * 64)  # a wrong hint: no table under it, so the file is read and the right one found
    assert conversation_table(DataSpec(str(path)), cache_dir=cache).fingerprint == t1.fingerprint
    assert memo.read_text() != "f" * 64


def test_a_killed_build_is_removed_by_the_next_build_and_a_running_one_kept(tmp_path):
    from imtune.records.sources import DataSpec, conversation_table

    cache = tmp_path / "cache"
    cache.mkdir()
    # What builds leave in the cache: one killed (its pid is gone; pid_max is at most 2**22), one still running (our
    # parent process), each for other data than the build below.
    dead, live = cache / f".{'a' * 32}.tmp-999999999", cache / f".{'b' * 32}.tmp-{os.getppid()}"
    for d in (dead, live):
        d.mkdir()
        (d / "table.arrow").write_bytes(b"half written")
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(tulu_rows(3)))
    t = conversation_table(DataSpec(str(good)), cache_dir=cache)
    assert len(t.dataset) == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted([t.fingerprint, live.name])


def test_failed_or_interrupted_build_leaves_nothing_trusted(tmp_path):
    from imtune.errors import InputError
    from imtune.records.sources import MARKER, DataSpec, conversation_table

    cache = tmp_path / "cache"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(tulu_rows(5, bad=3)))
    with pytest.raises(InputError, match=r"bad.jsonl:4: message 1: empty content"):
        conversation_table(DataSpec(str(bad)), cache_dir=cache)
    assert not any(cache.iterdir())  # neither an entry nor a temporary directory
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(tulu_rows(3)))
    fp = conversation_table(DataSpec(str(good)), cache_dir=cache).fingerprint
    (cache / fp / MARKER).unlink()  # as if killed before the marker: the entry must not be trusted
    (cache / fp / "table.arrow").write_bytes(b"half a file")
    t = conversation_table(DataSpec(str(good)), cache_dir=cache)
    assert len(t.dataset) == 3 and (cache / fp / MARKER).is_file()


def test_compare_splits_a_hub_dataset_and_records_its_source(tmp_path):
    home = tmp_path / "hf"
    put_dataset(home, "org/multi", {"README.md": CARD,
                                    "data/train-00000-of-00001.parquet": parquet(tulu_rows(10)),
                                    "data/test-00000-of-00001.parquet": parquet(tulu_rows(4, tag="test-")),
                                    "alt/train-0.parquet": parquet(tulu_rows(2))})
    out = _py(f"""
from imtune.cli.main import build_parser
from imtune.cli.compare import config_from_args
from imtune.analysis.compare import make_split
args = build_parser().parse_args(["compare", "--data", "org/multi", "--data-split", "test", "--out", "x",
                                  "--val-fraction", "0.25"])
cfg = config_from_args(args)
_, _, info = make_split(cfg, __import__("pathlib").Path({str(tmp_path / "cmp")!r}))
out = {{"source": cfg.data_source, "info": info,
       "default": config_from_args(build_parser().parse_args(["compare", "--data", "a.jsonl", "--out", "x"])).data_source}}
""", home)
    assert out["source"] == {"split": "test"} and out["default"] == {}
    assert out["info"]["spec"]["data"] == "org/multi" and out["info"]["spec"]["data_source"] == {"split": "test"}
    assert out["info"]["n_train"] + out["info"]["n_heldout"] == 4
    assert "test-question" in (tmp_path / "cmp" / "data" / "train.jsonl").read_text()
