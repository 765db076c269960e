"""`imtune advise --pilot --per-source`: the existing pilot run on each source of a training mixture."""

import json
from pathlib import Path

import yaml

from imtune.analysis.pilot import PilotConfig, run_pilot_per_source
from imtune.analysis.pilot_fit import CANNOT_TELL
from imtune.cli.main import main
from tests.test_pilot import _data


def test_a_pilot_per_source_says_which_objective_each_gets(tiny_dir, tmp_path, one_torch_thread, capsys):
    a, b = _data(tmp_path / "a.jsonl", 16), _data(tmp_path / "b.jsonl", 16)
    cfg_file = tmp_path / "mix.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": [{"path": str(a), "objective": "im"}, {"path": str(b), "n": 500}],
                                        "objective": "it"}))
    out = tmp_path / "pilot"
    rc = main(["advise", "--pilot", "--per-source", "--data", str(cfg_file), "--model", str(tiny_dir), "--out",
               str(out), "--pilot-sizes", "4,8", "--pilot-seeds", "1", "--pilot-heldout", "4", "--max-length", "48",
               "--template", "chatml", "--epochs", "1", "--n", "1000000"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(printed) == 2 and printed[0].startswith(f"data[0] {a}: objective ")
    r = json.loads((out / "per_source.json").read_text())
    assert [s["path"] for s in r["sources"]] == [str(a), str(b)]
    for s in r["sources"]:
        pilot = json.loads(Path(s["pilot"]).read_text())
        assert pilot["call"] == s["call"] and pilot["config"]["data"] == s["path"]
        # n far beyond the measured sizes: the pilot makes no call, and per source that reads "cannot tell"
        assert s["call"] == CANNOT_TELL and s["objective"] == "cannot tell"
    # a source's own n is the size its call is made for
    assert json.loads(Path(r["sources"][1]["pilot"]).read_text())["plan"]["n_target"] == 500
    # rerunning reuses every run
    again = run_pilot_per_source(PilotConfig(data=str(cfg_file), out=str(out), model=str(tiny_dir), sizes=(4, 8),
                                             seeds=1, n_val=4, max_length=48, template="chatml", epochs=1,
                                             n_target=1_000_000),
                                 [{"path": str(a)}, {"path": str(b), "n": 500}])
    assert [s["call"] for s in again["sources"]] == [s["call"] for s in r["sources"]]


def test_per_source_needs_a_yaml_list(tiny_dir, tmp_path, capsys):
    data = _data(tmp_path / "a.jsonl", 8)
    rc = main(["advise", "--pilot", "--per-source", "--data", str(data), "--model", str(tiny_dir),
               "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "must be a YAML file whose data: lists the sources" in err[0]
