"""Run trackers (`report_to`): TensorBoard, wandb and MLflow, each written through the library itself.

Every tracker has the same three calls: `log_config(config)` once, `log_step(row)` per metrics row and
`finish(summary, failed)` at the end; `training.outputs.MetricsLog` drives them, on the main process only. What a
tracker writes inside the run directory is claimed in the run's manifest before it is written, so `--overwrite`
and the clean-up after a failed run remove it. Metric names are the same everywhere: `train/<key>` and
`eval/<key>` per row, `final/<key>` for the final metrics.

Defaults that keep a run on this machine: wandb runs offline unless WANDB_MODE says otherwise (`wandb sync` uploads
the run later), MLflow writes a file store in the run directory unless MLFLOW_TRACKING_URI names another.

Resuming into the same directory: TensorBoard purges the steps being redone; MLflow continues the same run (its id
is kept in `tracking.json`) and keeps both values of a redone step; wandb continues the same run online
(`resume="allow"`) but cannot resume an offline run, so offline the resumed part is a new run (a note says so).
Resuming into another directory starts new wandb/MLflow runs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from imtune.config import DEFAULT_TRACKING_PROJECT, TrainConfig
from imtune.errors import ImtuneError

TB_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb.init(dir=OUT) writes OUT/wandb/
MLFLOW_DIR = "mlruns"
TRACKING_FILE = "tracking.json"  # the wandb / MLflow run ids, to continue the same runs on --resume
LOCAL_STATE = (TB_DIR, WANDB_DIR, MLFLOW_DIR, TRACKING_FILE)  # what a resumable failed run keeps


def scalars(row: dict) -> dict[str, float]:
    tag = "eval" if "eval_loss" in row else "train"
    return {f"{tag}/{k}": float(v) for k, v in row.items() if k not in ("step", "epoch") and _number(v)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _final_scalars(summary: dict) -> dict[str, float]:
    return {f"final/{k}": float(v) for k, v in summary.items() if _number(v)}


def error_text(tracker, e: BaseException) -> str:
    """`e` on one line, without the credentials a tracking URI may carry."""
    return _one_line(e, getattr(tracker, "uri", None))[:300]


def _one_line(e: BaseException, secret: str | None = None) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg.replace(secret, _redact(secret)) if secret else msg


def _redact(uri: str) -> str:
    """A tracking URI without the user:password it may carry."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        before = run_dir.listing(TB_DIR)
        run_dir.claim(TB_DIR, "dirs")
        self.writer = SummaryWriter(str(run_dir.out / TB_DIR), purge_step=purge_step)
        run_dir.adopt_new(TB_DIR, before)  # the event file the writer just created
        self.first_step = purge_step or 0

    def state(self) -> dict | None:
        return None

    def log_config(self, config: dict) -> None:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        self.writer.add_text("config", "".join("    " + line for line in text.splitlines(True)), self.first_step)

    def log_step(self, row: dict) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, row["step"])

    def finish(self, summary: dict | None, failed: bool) -> None:
        for k, v in _final_scalars(summary or {}).items():
            self.writer.add_scalar(k, v, summary.get("steps", 0))
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir, cfg: TrainConfig, previous: dict | None, say: Callable[[str], None]):
        import wandb

        user_mode = os.environ.get("WANDB_MODE")
        offline = (user_mode or "offline") in ("offline", "dryrun")
        run_id = resume = None
        if previous and offline:
            say(f"wandb cannot resume an offline run; the resumed part is a new offline run (the first was "
                f"{previous.get('run_id')})")
        elif previous:
            run_id, resume = previous.get("run_id"), "allow"
        run_dir.claim(WANDB_DIR, "trees")
        # No console capture (it would wrap this process' stdout/stderr), no git metadata (a remote URL can carry a
        # token), no code upload.
        settings = wandb.Settings(console="off", disable_git=True, save_code=False)
        try:
            self.run = wandb.init(project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or
                                  DEFAULT_TRACKING_PROJECT, name=cfg.run_name or run_dir.out.resolve().name,
                                  dir=str(run_dir.out), mode=None if user_mode else "offline", id=run_id,
                                  resume=resume, settings=settings)
        except Exception as e:  # wandb raises its own kinds (no API key online, bad mode, ...)
            raise ImtuneError(f"report_to wandb: could not start the run: {_one_line(e)}") from None

    def state(self) -> dict:
        return {"run_id": self.run.id, "project": self.run.project}

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_step(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def finish(self, summary: dict | None, failed: bool) -> None:
        if summary:
            self.run.summary.update({f"final/{k}": v for k, v in summary.items()})
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, run_dir, cfg: TrainConfig, previous: dict | None, say: Callable[[str], None]):
        from mlflow import MlflowClient

        self.say = say
        self.uri = uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            run_dir.claim(MLFLOW_DIR, "trees")
            self.uri = uri = (run_dir.out / MLFLOW_DIR).resolve().as_uri()
            # MLflow 3 asks for an opt-in to its file store; a local store inside the run directory is the point.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        experiment = cfg.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_TRACKING_PROJECT
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = previous.get("run_id") if previous else None
            if self.run_id and not self._reopen():
                say(f"mlflow: run {self.run_id} is not in the tracking store any more; logging to a new run")
                self.run_id, previous = None, None
            if not self.run_id:
                exp = self.client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
                name = cfg.run_name or run_dir.out.resolve().name
                self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        except Exception as e:  # MlflowException, or the store's own OSError / connection errors
            raise ImtuneError(f"report_to mlflow: could not start the run: {_one_line(e, uri)}") from None
        self.resumed = bool(previous)

    def _reopen(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(self.run_id)
        except MlflowException:
            return False
        self.client.update_run(self.run_id, status="RUNNING")
        return True

    def state(self) -> dict:
        return {"run_id": self.run_id}

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in config.items()}
        if self.resumed:  # MLflow params cannot change: keep the first values, log only new keys
            old = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k in params if k in old and old[k] != params[k])
            if changed:
                self.say(f"mlflow: run {self.run_id} keeps its first values of {', '.join(changed)} (MLflow "
                         "params cannot change)")
            params = {k: v for k, v in params.items() if k not in old}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def log_step(self, row: dict) -> None:
        self._log_metrics(scalars(row), row["step"])

    def finish(self, summary: dict | None, failed: bool) -> None:
        if summary:
            self._log_metrics(_final_scalars(summary), summary.get("steps", 0))
            self.client.log_dict(self.run_id, summary, "final_metrics.json")
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def open_trackers(cfg: TrainConfig, config: dict, run_dir, purge_step: int | None, resumed_from: Path | None,
                  say: Callable[[str], None]) -> list:
    """Start the trackers of `cfg.report_to` and log `config` (the resolved config) to each. A resumed run
    (`purge_step` set) continues the wandb/MLflow runs recorded in `tracking.json` when it resumes into the
    directory they were recorded in. On failure, the trackers already started are finished as failed."""
    resumed = purge_step is not None
    same_dir = resumed_from is None or Path(resumed_from).resolve() == run_dir.out.resolve()
    previous = _read_state(run_dir.out) if resumed and same_dir else {}
    trackers = []
    try:
        for name in cfg.report_to:
            if name == "tensorboard":
                try:
                    trackers.append(TensorBoardTracker(run_dir, purge_step))
                except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                    say("tensorboard is not importable; not writing TensorBoard events")
                continue
            if resumed and not previous.get(name):
                why = "" if same_dir else " (resumed into another directory)"
                say(f"{name}: no earlier {name} run of this directory to continue{why}; logging to a new run")
            cls = WandbTracker if name == "wandb" else MlflowTracker
            trackers.append(cls(run_dir, cfg, previous.get(name), say))
        state = {t.name: t.state() for t in trackers if t.state()}
        if state:
            from imtune.io_utils import atomic_write_json

            atomic_write_json(run_dir.claim(TRACKING_FILE), state)
        for t in trackers:
            t.log_config(config)
    except BaseException:
        finish_all(trackers, None, failed=True, say=say)
        raise
    return trackers


def finish_all(trackers: list, summary: dict | None, failed: bool, say: Callable[[str], None]) -> None:
    """Finish every tracker; one that fails to finish is reported, and does not stop the others."""
    for t in trackers:
        try:
            t.finish(summary, failed)
        except Exception as e:
            say(f"warning: {t.name} did not finish cleanly: {error_text(t, e)}")


def _read_state(out: Path) -> dict:
    p = out / TRACKING_FILE
    try:
        d = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}
