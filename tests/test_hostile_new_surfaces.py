"""A hostile user of the newer surfaces (per-message `weight`, YAML `data:` lists, `imtune export`, `imtune.hf`,
the per-source pilot): each bad input is one line naming the file / record / option and the reason, nothing is
trained on a value that cannot give a finite model, nothing is silently ignored, and a refused run leaves nothing."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import imtune
from imtune.config import TrainConfig
from imtune.errors import ImtuneError, InputError
from imtune.masking.objectives import parse_objective
from imtune.ranges import LOSS_WEIGHT_MAX, LOSS_WEIGHT_MIN, is_loss_weight
from imtune.records.conversation import Conversation
from imtune.records.loading import load_dataset


def _conv(i, weight="absent"):
    a = {"role": "assistant", "content": f"The answer is {i}."}
    if weight != "absent":
        a["weight"] = weight
    return {"messages": [{"role": "user", "content": f"question {i}: why is the sky blue?"}, a]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- per-message weight: a usable number or refused -------------------------------------------------------------
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_loss_weight_range(w):
    assert is_loss_weight(w) == (w == 0 or LOSS_WEIGHT_MIN <= w <= LOSS_WEIGHT_MAX)


@pytest.mark.parametrize("literal, reason", [
    ("1e308", "in [1e-06, 1e+06]"),  # x a token's loss overflows float32: a NaN step
    ("1e38", "in [1e-06, 1e+06]"),
    ("1e-45", "in [1e-06, 1e+06]"),  # subnormal: the step's normaliser became 0/0
    ("1" + "0" * 400, "finite"),  # an integer past float's range
    ('"0.5"', "got str"),
    ("true", "got bool"),
])
def test_message_weight_out_of_range_is_one_line_naming_file_and_line(tmp_path, literal, reason):
    path = tmp_path / "w.jsonl"
    bad = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": %s}]}'
    path.write_text(json.dumps(_conv(0)) + "\n" + bad % literal + "\n")
    with pytest.raises(InputError) as e:
        load_dataset(path)
    assert str(e.value).startswith(f"{path}:2: message 1: weight must be") and reason in str(e.value)
    assert "\n" not in str(e.value)


def test_negative_zero_weight_is_zero(tmp_path):
    recs = load_dataset(_jsonl(tmp_path / "z.jsonl", [_conv(0, -0.0), _conv(1, 1e-6), _conv(2, 1e6)])).records
    weights = [r.messages[1].weight for r in recs]
    assert weights == [0.0, 1e-6, 1e6] and str(weights[0]) == "0.0"


@pytest.mark.parametrize("row", [
    {"instruction": "say hi", "input": "", "output": "hi", "weight": 0},
    {"prompt": "say hi", "completion": "hi", "weight": "x"},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "weight": 0},
])
def test_record_level_weight_is_refused_not_ignored(tmp_path, row):
    """A `weight` beside the messages (or in a form without messages) used to be dropped: trained at weight 1."""
    with pytest.raises(InputError, match=r"w.jsonl:1: a record-level 'weight' is not read"):
        load_dataset(_jsonl(tmp_path / "w.jsonl", [row]))


def test_csv_weight_column_is_refused(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("prompt,completion,weight\nsay hi,hi,0\n")
    with pytest.raises(InputError, match="record-level 'weight'"):
        load_dataset(path)
    path.write_text("prompt,completion,weight\nsay hi,hi,\n")  # an empty cell is no weight
    assert len(load_dataset(path).records) == 1


@pytest.mark.parametrize("spec", ["weighted:1e38", "weighted:1e-45", "weighted:0.1:1e300", "weighted:nan"])
def test_objective_weights_share_the_range(spec):
    with pytest.raises(ImtuneError, match="weights must be 0 or a number in"):
        parse_objective(spec)


def test_hf_encode_dataset_refuses_bad_weights_and_lengths(tiny_tok):
    from imtune.hf import encode_dataset

    with pytest.raises(InputError, match=r"record 0: message 1: weight must be 0 or a number in"):
        encode_dataset([_conv(0, 1e308)], tiny_tok, "it", template="chatml")
    for bad in (float("nan"), "64", 1, 2**64):
        with pytest.raises(ImtuneError, match="max_length must be an integer in"):
            encode_dataset([_conv(0)], tiny_tok, "it", template="chatml", max_length=bad)
    for bad in (None, 5, b"x.jsonl"):
        with pytest.raises(TypeError, match="data must be a path, a datasets.Dataset or a list of records"):
            encode_dataset(bad, tiny_tok, "it", template="chatml")


# ---- data: lists ------------------------------------------------------------------------------------------------
def test_source_list_messages_name_the_problem():
    with pytest.raises(ImtuneError, match=r"data\[0\] missing: the data: list is empty"):
        TrainConfig.from_dict({"data": []})
    with pytest.raises(ImtuneError, match=r"data\[1\]: unknown key 'objectve'; did you mean 'objective'\?"):
        TrainConfig.from_dict({"data": ["a.jsonl", {"path": "b.jsonl", "objectve": "it"}]})
    with pytest.raises(ImtuneError, match=r"data\[0\]: unknown key 'size' \(keys: path, n"):
        TrainConfig.from_dict({"data": [{"path": "a", "size": 3}]})
    with pytest.raises(ImtuneError, match=r"^data\[1\] b.jsonl: objective 'weighted:1e\+09': weights must be 0 or"):
        TrainConfig.from_dict({"data": ["a.jsonl", {"path": "b.jsonl", "objective": "weighted:1e9"}], "out": "o"}).validate()


def test_a_source_with_nothing_to_train_is_refused(tiny_dir, tmp_path):
    """One --data with every weight 0 is refused; as a source of a mixture it was silently left out."""
    zero = _jsonl(tmp_path / "zero.jsonl", [_conv(i, 0) for i in range(4)])
    good = _jsonl(tmp_path / "good.jsonl", [_conv(i) for i in range(4)])
    cfg = dict(model=str(tiny_dir), data=[str(good), str(zero)], out=str(tmp_path / "run"), template="chatml",
               max_length=64, max_steps=1, objective="it", progress=False, encode_cache_dir=str(tmp_path / "c"))
    with pytest.raises(ImtuneError, match=r"data\[1\] .*zero.jsonl: no example has a token with non-zero weight"):
        imtune.train(cfg)
    assert not (tmp_path / "run").exists()


def test_empty_data_name_is_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "x.jsonl", [_conv(0)])
    for empty in ("", "  "):
        with pytest.raises(ImtuneError, match="an empty name is not a data file"):
            load_dataset(empty)


# ---- names that are not UTF-8 -----------------------------------------------------------------------------------
def test_dataset_directory_with_a_non_utf8_file_name(tmp_path):
    from imtune.records.hub_sources import file_digest, folder_digest

    d = tmp_path / "ds"
    d.mkdir()
    _jsonl(d / "a.jsonl", [_conv(0)])
    before = folder_digest(d)  # a UTF-8 name is hashed as before the fix: same bytes, same digest
    assert before == hashlib.sha256(f"a.jsonl\0{file_digest(d / 'a.jsonl')}\n".encode()).hexdigest()
    _jsonl(Path(os.fsdecode(bytes(d) + b"/b\xffname.jsonl")), [_conv(1)])
    assert folder_digest(d) != before
    assert len(load_dataset(d).records) == 2


def test_export_of_a_file_with_a_non_utf8_name(tiny_tok, tmp_path):
    from imtune.hf.export import MARKER, export_dataset

    data = _jsonl(Path(os.fsdecode(bytes(tmp_path) + b"/bad\xffname.jsonl")), [_conv(i) for i in range(3)])
    out, info = export_dataset(str(data), tiny_tok, tmp_path / "exp", "it", template="chatml")
    assert info.n_examples == 3
    assert json.loads((out / MARKER).read_text(encoding="utf-8"))["data"] == str(data)


# ---- the per-source pilot ---------------------------------------------------------------------------------------
def test_a_refused_pilot_leaves_no_directory(tiny_dir, tmp_path):
    from imtune.analysis.pilot import PilotConfig, run_pilot

    data = _jsonl(tmp_path / "few.jsonl", [_conv(i) for i in range(8)])
    out = tmp_path / "pilot"
    with pytest.raises(ImtuneError, match="too few for a pilot"):
        run_pilot(PilotConfig(data=str(data), out=str(out), model=str(tiny_dir), template="chatml", budget_min=0.1))
    assert not out.exists()


# ---- the CLI: exit 2, one line, nothing written ---------------------------------------------------------------
def test_cli_huge_weight_is_one_line_and_writes_nothing(tiny_dir, tmp_path):
    data = _jsonl(tmp_path / "huge.jsonl", [_conv(i, 1e308) for i in range(2)])
    out = tmp_path / "exp"
    p = subprocess.run([sys.executable, "-m", "imtune.cli.main", "export", "--data", str(data), "--model",
                        str(tiny_dir), "--template", "chatml", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = [line for line in p.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"{data}:1: message 1: weight must be 0 or a number in [1e-06, 1e+06]" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["huge.jsonl"]


def test_a_refused_weighted_trainer_leaves_no_output_dir(tiny_dir, tiny_tok, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from imtune.hf import WeightedTrainer, encode_dataset

    ds = encode_dataset([_conv(0)], tiny_tok, "it", template="chatml")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    out = tmp_path / "trainer"
    args = TrainingArguments(str(out), report_to=[], label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label_smoothing_factor is not applied"):
        WeightedTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_tok)
    assert not out.exists()


@pytest.mark.parametrize("extra, flag", [(["--per-source"], "--per-source"), (["--out", "somewhere"], "--out")])
def test_pilot_options_without_pilot_are_refused_not_ignored(tiny_dir, tmp_path, capsys, extra, flag):
    from imtune.cli.main import main

    data = _jsonl(tmp_path / "d.jsonl", [_conv(0)])
    assert main(["advise", "--data", str(data), "--model", str(tiny_dir), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"imtune advise: error: {flag} applies to the measured pilot; add --pilot"]


def test_a_plugin_objective_is_held_to_the_weight_range(tiny_tok):
    import numpy as np

    from imtune.masking.encoding import encode_with_report
    from imtune.masking.objectives import Objective, register_objective

    @register_objective("hostile-huge")
    class Huge(Objective):
        def token_weights(self, t):
            return np.full(len(t.classes), 1e10, np.float32)  # finite in float32, inf once summed and squared

    with pytest.raises(ImtuneError, match=r"token weights must be finite and >= 0: 0 or a number in \[1e-06"):
        encode_with_report([Conversation.from_messages(_conv(0)["messages"])],
                           tiny_tok, "hostile-huge", "chatml", None)


# ---- outputs and error lines ---------------------------------------------------------------------------------------
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "imtune.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_an_output_inside_a_data_directory_is_refused(tiny_dir, tmp_path):
    """The directory is read whole: an export written inside it would become its data on the next read."""
    d = tmp_path / "dsdir"
    d.mkdir()
    _jsonl(d / "part.jsonl", [_conv(i) for i in range(3)])
    before = sorted(p.name for p in d.iterdir())
    p = _cli("export", "--data", d, "--model", tiny_dir, "--template", "chatml", "--out", d / "exp")
    assert p.returncode == 2 and "is inside" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert sorted(q.name for q in d.iterdir()) == before
    # A model directory may hold a command's outputs (`loss --model run --out run/x.jsonl`).
    from imtune.io_utils import prepare_output

    assert prepare_output(tiny_dir / "sub" / "x.jsonl", [tiny_dir]) == tiny_dir / "sub" / "x.jsonl"


def test_an_error_quoting_a_line_break_stays_one_line(tmp_path):
    bad = tmp_path / "a\nb.jsonl"
    bad.write_text("{}\n")
    p = _cli("stats", "--data", bad)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "a\\nb.jsonl" in p.stderr, p.stderr


def test_a_data_file_whose_name_is_not_utf8_trains(tiny_dir, tmp_path):
    name = os.fsencode(str(tmp_path)) + b"/bad\xffname.jsonl"
    with open(name, "w") as f:
        f.write("".join(json.dumps(_conv(i)) + "\n" for i in range(4)))
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "imtune.cli.main", "train", "--model", str(tiny_dir), "--template",
                        "chatml", "--data", os.fsdecode(name), "--out", str(out), "--max-steps", "1",
                        "--no-checkpoints"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "bad\\udcffname" in (out / "README.md").read_text(encoding="utf-8")
