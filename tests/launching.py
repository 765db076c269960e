"""Run `accelerate launch` with several CPU processes from a test: a free port, and no process left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import imtune

ACCELERATE_CONFIGS = Path(imtune.__file__).parent / "accelerate_configs"


def launcher() -> str | None:
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.exists() else shutil.which("accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_DISABLE_RICH": "1", "CUDA_VISIBLE_DEVICES": ""}


def command(launch_args: list[str], target: list[str]) -> list[str]:
    """`accelerate launch LAUNCH_ARGS --main_process_port FREE TARGET...` (TARGET: a script or `-m module`)."""
    return [launcher(), "launch", *launch_args, "--main_process_port", str(free_port()), *target]


def cli_args(cfg: dict) -> list[str]:
    """`imtune train` flags for a TrainConfig dict."""
    out = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def reap(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Kill the launcher and every worker it started (torchrun puts each worker in a session of its own)."""
    import psutil

    procs = descendants(proc.pid)
    if proc.poll() is None:
        procs.append(psutil.Process(proc.pid))
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=timeout)
    proc.wait(timeout=timeout)


def run(cmd: list[str], log: Path, timeout: float = 400) -> int:
    proc = start(cmd, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        reap(proc)


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")
        time.sleep(0.02)


def tail(log: Path | None, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log is not None and log.exists() else ""


def kill_launcher_after_first_checkpoint(cmd: list[str], out: Path, log: Path, n_workers: int | None = None) -> None:
    """Start a training launch, SIGKILL the launcher once checkpoint 2 is complete, and check that its workers die
    with it (PR_SET_PDEATHSIG) and that the run left a checkpoint to resume from and no final model."""
    import psutil

    proc = start(cmd, log)
    try:
        wait_for((out / "checkpoints" / "checkpoint-000002").is_dir, 300, "the first checkpoint", proc, log)
        workers = descendants(proc.pid)
        if n_workers is not None:
            assert len([w for w in workers if "imtune.cli.main" in " ".join(w.cmdline())]) == n_workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [w.pid for w in alive]
    finally:
        reap(proc)
    assert not (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()
    done = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert done and max(done) < "checkpoint-000020"
