"""Outputs never touch what imtune did not create (issue 8 §1): each reproduction from the issue, as a test."""

import json
import os

import pytest

from imtune.cli.main import main
from imtune.errors import ImtuneError
from imtune.io_utils import prepare_output
from imtune.training.outputs import MANIFEST

from .test_training import write_data


@pytest.fixture()
def data(tmp_path):
    return write_data(tmp_path / "d.jsonl")


def write_data_at(path, n=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_data(path, n=n)


def train_args(tiny_dir, data, out, *extra):
    return ["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--template", "chatml",
            "--max-length", "96", "--micro-batch-size", "2", "--max-steps", "2", "--no-progress", *extra]


def snapshot(d):
    """Every path under `d` with its bytes (None for directories)."""
    return {p.relative_to(d).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


# ---- imtune train --overwrite ---------------------------------------------------------------------------------------
def test_overwrite_refuses_a_home_directory_with_a_checkpoints_folder(tiny_dir, data, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    (home / "Documents").mkdir()
    (home / "Documents" / "thesis.tex").write_text("years of work")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text("key")
    (home / ".bashrc").write_text("alias ll='ls -l'")
    (home / "imtune_config.yaml").write_text("lr: 1\n")
    before = snapshot(home)
    assert main(train_args(tiny_dir, data, home, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "refusing to --overwrite" in err and f"{home / '.bashrc'} was not written by imtune" in err
    assert snapshot(home) == before


def test_overwrite_removes_only_what_the_manifest_lists(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_dir, data, out)) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert written == set(manifest["files"])  # every file the run wrote is listed, tensorboard's event file too
    # a file the user put into the run directory (even into a folder imtune made) blocks --overwrite
    (out / "tensorboard" / "my_notes.txt").write_text("mine")
    before = snapshot(out)
    assert main(train_args(tiny_dir, data, out, "--overwrite")) == 2
    assert "tensorboard/my_notes.txt was not written by imtune" in capsys.readouterr().err
    assert snapshot(out) == before
    (out / "tensorboard" / "my_notes.txt").unlink()
    first_event = manifest["files"]
    assert main(train_args(tiny_dir, data, out, "--overwrite", "--seed", "5")) == 0
    again = json.loads((out / MANIFEST).read_text())
    assert set(again["files"]) != set(first_event)  # the old event file went, a new one came
    assert all((out / f).exists() for f in again["files"])


def test_failed_run_keeps_its_checkpoint_and_resume_never_replaces_a_foreign_file(tiny_dir, data, tmp_path, capsys,
                                                                                   monkeypatch):
    import imtune.training.loss as loss_mod

    real, calls = loss_mod.weighted_loss_sum, []

    def nan_from_step_2(model, batch, **kw):
        out = real(model, batch, **kw)
        calls.append(1)
        if len(calls) > 2:  # 2 micro-batches per step
            out.loss_sum = out.loss_sum * float("nan")
        return out

    out = tmp_path / "run"
    args = train_args(tiny_dir, data, out, "--max-steps", "3", "--save-steps", "1", "--global-batch-size", "4")
    monkeypatch.setattr(loss_mod, "weighted_loss_sum", nan_from_step_2)
    assert main(args) == 2
    monkeypatch.setattr(loss_mod, "weighted_loss_sum", real)
    err = capsys.readouterr().err
    assert "step 2: loss is nan" in err and "kept" in err and "checkpoint-000001" in err
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "checkpoints", "imtune_config.yaml", "metrics.jsonl",
                                                     "tensorboard"]
    (out / "README.md").write_text("my own notes")  # a name the final save would write
    assert main([*args, "--resume"]) == 2
    assert "README.md exists and was not written by imtune" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "my own notes" and not (out / "model.safetensors").exists()
    (out / "README.md").unlink()
    assert main([*args, "--resume"]) == 0  # the checkpoints both failures kept let the run finish
    assert (out / "model.safetensors").exists() and "README.md" in json.loads((out / MANIFEST).read_text())["files"]


def test_failed_run_leaves_nothing_it_created(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "never"
    # the update overflows the weights on step 1: exit 2, and the run removes everything it wrote
    assert main(train_args(tiny_dir, data, out, "--lr", "1e39", "--max-steps", "1", "--warmup-ratio", "0")) == 2
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(train_args(tiny_dir, data, empty, "--lr", "1e39", "--max-steps", "1", "--warmup-ratio", "0")) == 2
    assert empty.is_dir() and not any(empty.iterdir())  # the directory was the user's: it stays, empty
    assert "removed what it wrote" in capsys.readouterr().err


def test_train_refuses_an_output_that_contains_its_data(tiny_dir, tmp_path, capsys):
    data = write_data_at(tmp_path / "proj" / "data" / "train.jsonl")
    before = data.read_bytes()
    assert main(train_args(tiny_dir, data, tmp_path / "proj", "--overwrite")) == 2
    assert "contains an input" in capsys.readouterr().err and data.read_bytes() == before


# ---- imtune compare -------------------------------------------------------------------------------------------------
def test_compare_never_writes_over_its_input(tmp_path, monkeypatch, capsys):
    proj = tmp_path / "proj"
    data = write_data_at(proj / "data" / "train.jsonl", n=16)
    before = data.read_bytes()
    monkeypatch.chdir(proj)
    assert main(["compare", "--data", "data/train.jsonl", "--out", "."]) == 2
    assert "contains an input" in capsys.readouterr().err
    assert data.read_bytes() == before and sorted(p.name for p in proj.iterdir()) == ["data"]


def test_compare_refuses_split_files_it_did_not_write(tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", n=16)
    out = tmp_path / "cmp"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text("the user's own file\n")
    assert main(["compare", "--data", str(data), "--out", str(out)]) == 2
    assert "was not written by imtune compare" in capsys.readouterr().err
    assert (out / "data" / "train.jsonl").read_text() == "the user's own file\n"


def test_compare_on_bad_data_leaves_no_output_directory(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not out.exists()


# ---- one-file outputs: a directory is refused before any work -------------------------------------------------------
def one_file_commands(data, model, out):
    return {
        "evaluate": ["evaluate", "--model", str(model), "--tasks", "arc_easy", "--limit", "2", "--out", str(out)],
        "loss": ["loss", "--model", str(model), "--data", str(data), "--out", str(out)],
        "generate": ["generate", "--model", str(model), "--data", str(data), "--out", str(out)],
        "inspect": ["inspect", "--model", str(model), "--data", str(data), "--format", "json", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["evaluate", "loss", "generate", "inspect"])
def test_one_file_out_that_is_a_directory_fails_before_any_work(command, data, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    # The model does not exist: had the command started its work, it would fail on the model instead.
    args = one_file_commands(data, tmp_path / "no_such_model", out)[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is a directory" in err, err
    assert not any(out.iterdir())


@pytest.mark.parametrize("command", ["loss", "generate", "inspect"])
def test_one_file_out_that_is_the_input_is_refused(command, data, tmp_path, capsys):
    before = data.read_bytes()
    assert main(one_file_commands(data, tmp_path / "no_such_model", data)[command]) == 2
    assert "is an input of this command" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_plot_and_memorisation_and_judge_refuse_their_inputs(tmp_path, capsys):
    losses = tmp_path / "l.png"
    losses.write_text(json.dumps({"loss": 1.0}) + "\n")
    assert main(["plot", str(losses), "--out", str(tmp_path / "l")]) == 2  # would write l.png over the input
    gens = tmp_path / "mem" / "generations.jsonl"
    gens.parent.mkdir()
    gens.write_text(json.dumps({"output": "a", "reference": "a"}) + "\n")
    assert main(["memorisation", "--generations", str(gens), "--out", str(gens.parent)]) == 2
    outs = tmp_path / "ae" / "model_outputs.json"
    outs.parent.mkdir()
    outs.write_text("[]")
    assert main(["judge", "alpaca-eval", "--outputs", str(outs), "--judge-base-url", "http://127.0.0.1:9/v1",
                 "--judge-model", "m", "--out", str(outs.parent)]) == 2
    err = capsys.readouterr().err
    assert err.count("input of this command") == 3, err
    assert losses.read_text().startswith("{") and gens.exists() and outs.read_text() == "[]"


# ---- the shared helper ----------------------------------------------------------------------------------------------
def test_prepare_output(tmp_path):
    data = tmp_path / "d" / "x.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    assert prepare_output(tmp_path / "new" / "r.json", [data, None, "smollm2-135m"]) == tmp_path / "new" / "r.json"
    assert not (tmp_path / "new").exists()  # checking writes nothing
    with pytest.raises(ImtuneError, match="is an input"):
        prepare_output(data, [data])
    with pytest.raises(ImtuneError, match="contains an input"):
        prepare_output(tmp_path, [data], kind="dir")
    with pytest.raises(ImtuneError, match="is a directory; give a file path, e.g."):
        prepare_output(tmp_path / "d", [])
    with pytest.raises(ImtuneError, match="exists and is not a directory"):
        prepare_output(data, [], kind="dir")
    with pytest.raises(ImtuneError, match="is not a directory"):
        prepare_output(data / "r.json", [])
    link = tmp_path / "link.jsonl"
    os.symlink(data, link)
    with pytest.raises(ImtuneError, match="is an input"):
        prepare_output(link, [data])  # the same file under another name
    # an alias that happens to name nothing on disk is not an input to protect
    prepare_output(tmp_path, ["smollm2-135m"], kind="dir")


def test_resume_into_a_directory_without_a_manifest_is_refused(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_dir, data, out, "--save-steps", "1")) == 0
    (out / MANIFEST).unlink()  # as left by an older imtune, or a directory imtune never wrote
    before = snapshot(out)
    assert main(train_args(tiny_dir, data, out, "--resume")) == 2
    assert f"has no {MANIFEST}" in capsys.readouterr().err and snapshot(out) == before
    ckpt = out / "checkpoints" / "checkpoint-000002"
    assert main(train_args(tiny_dir, data, tmp_path / "new", "--resume", str(ckpt))) == 0  # the way out it names
    rows = [json.loads(x) for x in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # the history came along with the checkpoint
