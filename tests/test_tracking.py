"""`report_to`: runs logged to TensorBoard, wandb (offline) and MLflow (local file store), read back with each
library's own reader; a tracker that is not installed stops the run before it starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imtune.cli.main import main
from imtune.config import TrainConfig
from imtune.errors import ImtuneError
from imtune.training.outputs import MANIFEST

from .test_training import write_data

ROOT = Path(__file__).resolve().parents[1]
SECRET = "imtune-test-secret-0123456789abcdef01234"  # a fake API key / token: must never reach a file imtune writes


@pytest.fixture()
def tracker_env(monkeypatch, tmp_path):
    """The defaults a user gets (wandb offline, MLflow in the run directory), quiet and with fake credentials."""
    for k in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    # imtune opts in to MLflow's file store itself; setenv first so that teardown removes what imtune set
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    for k, v in {"WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_API_KEY": SECRET,
                 "MLFLOW_TRACKING_TOKEN": SECRET, "WANDB_CONFIG_DIR": str(tmp_path / "wandb-home"),
                 "WANDB_CACHE_DIR": str(tmp_path / "wandb-home"), "WANDB_DATA_DIR": str(tmp_path / "wandb-home")}.items():
        monkeypatch.setenv(k, v)
    return monkeypatch


@pytest.fixture()
def data(tmp_path):
    return write_data(tmp_path / "d.jsonl")


def train_args(tiny_dir, data, out, *extra):
    return ["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--template", "chatml",
            "--max-length", "96", "--micro-batch-size", "2", "--max-steps", "3", "--no-progress", "--precision",
            "fp32", *extra]


def rows_of(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def mlflow_client(out):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())


def wandb_records(run_file):
    """The offline run's records, read by wandb's own reader of .wandb transaction logs (wandb-core)."""
    def inspect(*flags):
        res = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_file)],
                             capture_output=True, text=True, timeout=120, check=True)
        return res.stdout

    records = [json.loads(line) for line in inspect().splitlines() if line.strip()]
    return records, json.loads(inspect("--summary"))


# ---- the config --------------------------------------------------------------------------------------------------
def test_report_to_from_flags_and_yaml(tmp_path):
    from imtune.cli.main import build_parser
    from imtune.config import config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv]))

    assert TrainConfig().report_to == ["tensorboard"] and cfg().report_to == ["tensorboard"]
    assert cfg("--report-to", "TensorBoard, wandb,wandb").report_to == ["tensorboard", "wandb"]
    assert cfg("--report-to", "none").validate().report_to == []
    y = tmp_path / "c.yaml"
    y.write_text("report_to: [mlflow, wandb]\nwandb_project: p\nrun_name: r\nmlflow_experiment: e\n")
    c = TrainConfig.from_yaml(y)
    assert (c.report_to, c.wandb_project, c.run_name, c.mlflow_experiment) == (["mlflow", "wandb"], "p", "r", "e")
    assert TrainConfig.from_dict(c.to_dict()) == c  # the saved config round-trips
    with pytest.raises(ImtuneError, match="'comet' is not one of tensorboard, wandb, mlflow, none"):
        cfg("--report-to", "wandb,comet").validate()
    with pytest.raises(ImtuneError, match="none turns tracking off and cannot be combined"):
        cfg("--report-to", "none,wandb").validate()
    with pytest.raises(ImtuneError, match="report_to must be a comma-separated list"):
        TrainConfig.from_dict({"report_to": {"wandb": 1}})


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_stops_the_run_before_it_starts(tiny_dir, data, tmp_path, tracker):
    out = tmp_path / "run"
    prelude = f"import sys; sys.modules[{tracker!r}] = None; from imtune.cli.main import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", prelude, *train_args(tiny_dir, data, out, "--report-to",
                                                                     f"tensorboard,{tracker}")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"imtune train: error: report_to: {tracker} is not installed; pip install 'imtune[{tracker}]'"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


# ---- one run, three trackers ---------------------------------------------------------------------------------------
@pytest.mark.slow  # ~20 s on a busy 2-core machine (importing mlflow alone takes seconds)
def test_all_three_trackers_read_back(tiny_dir, data, tmp_path, tracker_env, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(train_args(tiny_dir, data, out, "--val-fraction", "0.25", "--report-to", "tensorboard,wandb,mlflow",
                           "--wandb-project", "imtune-test", "--mlflow-experiment", "exp-test",
                           "--run-name", "tiny-im")) == 0
    rows = rows_of(out)
    train_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    final = json.loads((out / "final_metrics.json").read_text())
    assert [r["step"] for r in train_rows] == [1, 2, 3] and eval_rows
    keys = ("loss", "lr", "tokens_per_s", "weighted_tokens", "grad_norm")
    ids = json.loads((out / "tracking.json").read_text())

    # TensorBoard, read by TensorBoard's own event reader
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    for k in keys:
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in ea.Scalars(f"train/{k}")] == \
            [(r["step"], r[k]) for r in train_rows]
    assert ea.Scalars("eval/eval_loss")[-1].value == pytest.approx(eval_rows[-1]["eval_loss"], rel=1e-6)
    assert ea.Scalars("final/train_loss")[0].value == pytest.approx(final["train_loss"], rel=1e-6)
    assert "config/text_summary" in ea.Tags()["tensors"]

    # MLflow, read by MlflowClient from the file store inside the run directory
    client = mlflow_client(out)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-im"
    assert client.get_experiment(run.info.experiment_id).name == "exp-test"
    for k in keys:
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"train/{k}")] == \
            [(r["step"], pytest.approx(r[k])) for r in train_rows]
    assert run.data.metrics["eval/eval_loss"] == pytest.approx(eval_rows[-1]["eval_loss"])
    assert run.data.metrics["final/steps"] == 3 and run.data.metrics["final/train_loss"] == pytest.approx(
        final["train_loss"])
    assert run.data.params["objective"] == "im" and run.data.params["precision"] == "fp32"
    assert run.data.params["report_to"] == str(["tensorboard", "wandb", "mlflow"])
    local = Path(client.download_artifacts(run.info.run_id, "final_metrics.json", str(tmp_path)))
    assert json.loads(local.read_text()) == final

    # wandb: the offline run's transaction log, read back by wandb's own reader
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{ids['wandb']['run_id']}/run-*.wandb")
    records, summary = wandb_records(run_file)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3]
    for k in keys:
        assert [h[f"train/{k}"] for h in history] == [pytest.approx(r[k]) for r in train_rows]
    assert history[-1]["eval/eval_loss"] == pytest.approx(eval_rows[-1]["eval_loss"])
    assert summary["state"] == "finished" and summary["project"] == "imtune-test" and summary["name"] == "tiny-im"
    assert summary["config"]["objective"] == "im" and summary["config"]["report_to"] == ["tensorboard", "wandb",
                                                                                         "mlflow"]
    assert summary["summary"]["final/train_loss"] == pytest.approx(final["train_loss"])
    assert summary["summary"]["final/data"] == final["data"]

    # credentials never reach a file in the run directory; every path is in the manifest, so --overwrite removes it
    leaked = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in capsys.readouterr().err
    manifest = json.loads((out / MANIFEST).read_text())
    assert {"wandb", "mlruns"} <= set(manifest["trees"]) and "tracking.json" in manifest["files"]
    assert main(train_args(tiny_dir, data, out, "--overwrite", "--report-to", "none", "--max-steps", "1")) == 0
    assert not {"wandb", "mlruns", "tensorboard", "tracking.json"} & {p.name for p in out.iterdir()}


# ---- failure and resume -------------------------------------------------------------------------------------------
def test_a_failed_run_ends_its_tracked_runs_and_resume_continues_them(tiny_dir, data, tmp_path, tracker_env,
                                                                      capsys):
    import imtune.training.loss as loss_mod

    real, calls = loss_mod.weighted_loss_sum, []

    def nan_from_step_2(model, batch, **kw):
        o = real(model, batch, **kw)
        calls.append(1)
        if len(calls) > 2:  # 2 micro-batches per step
            o.loss_sum = o.loss_sum * float("nan")
        return o

    out = tmp_path / "run"
    args = train_args(tiny_dir, data, out, "--save-steps", "1", "--global-batch-size", "4", "--report-to",
                      "wandb,mlflow")
    tracker_env.setattr(loss_mod, "weighted_loss_sum", nan_from_step_2)
    assert main(args) == 2
    tracker_env.setattr(loss_mod, "weighted_loss_sum", real)
    assert "kept" in capsys.readouterr().err
    ids = json.loads((out / "tracking.json").read_text())
    client = mlflow_client(out)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "FAILED"
    (first,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_records(first)[1]["exit_code"] == 1

    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "wandb cannot resume an offline run; the resumed part is a new offline run" in err
    again = json.loads((out / "tracking.json").read_text())
    assert again["mlflow"] == ids["mlflow"] and again["wandb"]["run_id"] != ids["wandb"]["run_id"]
    run = client.get_run(ids["mlflow"]["run_id"])  # the same MLflow run, continued
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    (second,) = (out / "wandb").glob(f"offline-run-*-{again['wandb']['run_id']}/run-*.wandb")
    records, summary = wandb_records(second)
    assert [r["history"]["item"]["_step"] for r in records if r["type"] == "history"] == [2, 3]
    assert summary["state"] == "finished" and summary["summary"]["final/steps"] == 3


def test_a_failed_run_without_checkpoint_leaves_no_tracker_files(tiny_dir, data, tmp_path, tracker_env):
    out = tmp_path / "never"
    assert main(train_args(tiny_dir, data, out, "--lr", "1e39", "--max-steps", "1", "--warmup-ratio", "0",
                           "--report-to", "tensorboard,wandb,mlflow")) == 2
    assert not out.exists()


def test_report_to_none_writes_no_tracker_files(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_dir, data, out, "--report-to", "none", "--max-steps", "1")) == 0
    names = {p.name for p in out.iterdir()}
    assert "metrics.jsonl" in names and not {"tensorboard", "wandb", "mlruns", "tracking.json"} & names


@pytest.mark.parametrize("uri, shown", [
    ("https://alice:s3cret@mlflow.example.com/api", "https://***@mlflow.example.com/api"),
    ("https://token@mlflow.example.com", "https://***@mlflow.example.com"),
    ("http://mlflow.example.com:5000", "http://mlflow.example.com:5000"),
    ("file:///tmp/run/mlruns", "file:///tmp/run/mlruns"),
])
def test_error_messages_never_show_a_tracking_uri_password(uri, shown):
    from imtune.training.tracking import error_text

    class Tracker:
        pass

    t = Tracker()
    t.uri = uri
    text = error_text(t, RuntimeError(f"cannot reach {uri}:\n connection refused"))
    assert text == f"cannot reach {shown}: connection refused"


def test_compare_passes_report_to_on_and_does_not_retrain_for_it(tmp_path):
    from imtune.analysis.compare import _config_key, _train_config
    from imtune.cli.compare import config_from_args
    from imtune.cli.main import build_parser

    args = build_parser().parse_args(["compare", "--data", "d.jsonl", "--out", str(tmp_path / "cmp"),
                                      "--report-to", "wandb,mlflow", "--wandb-project", "p"])
    ccfg = config_from_args(args)
    tcfg = _train_config(ccfg, "im", tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path / "runs" / "im")
    assert tcfg.report_to == ["wandb", "mlflow"] and tcfg.wandb_project == "p"
    # tracking is not a training setting: a finished run stays reusable when only the trackers change
    assert _config_key(tcfg) == _config_key(tcfg.replace(report_to=["tensorboard"], wandb_project=None))
    assert _config_key(tcfg) != _config_key(tcfg.replace(lr=1e-3))
