"""The run directory: config, metrics log (JSONL + TensorBoard) and the final model, written atomically."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

from imtune.config import TrainConfig
from imtune.errors import ImtuneError
from imtune.training import checkpointing

CONFIG_FILE = "imtune_config.yaml"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def note(msg: str) -> None:
    print(f"imtune train: {msg}", file=sys.stderr, flush=True)


def check_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ImtuneError(f"out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.resume:
        if not cfg.overwrite:
            raise ImtuneError(f"out: {out} is not empty; pass --overwrite to replace it or --resume to continue")
        if not ((out / CONFIG_FILE).exists() or (out / checkpointing.CHECKPOINTS).exists()):
            raise ImtuneError(f"out: refusing to --overwrite {out}: it does not look like an imtune output "
                              f"directory (no {CONFIG_FILE})")
    return out


def clear_dir(out: Path) -> None:
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def saved_config(cfg: TrainConfig) -> dict:
    # resume/overwrite describe one invocation, not the run: re-using the file should start a run, not resume one.
    return cfg.replace(resume=None, overwrite=False).to_dict()


def save_final(cfg: TrainConfig, out: Path, model, tokenizer, accelerator, card: str, sharded: bool,
               chat_template: str | None) -> None:
    """Write model, tokenizer and card to a temp dir, then rename the files into `out` (config.json and README
    last, so a directory that looks loadable is complete)."""
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if not accelerator.is_main_process:
        return
    from imtune.io_utils import atomic_write_text

    unwrapped = accelerator.unwrap_model(model)
    tmp = out / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if cfg.lora and cfg.merge:
            unwrapped = unwrapped.merge_and_unload()
            state_dict = None
        if hasattr(unwrapped, "config"):
            unwrapped.config.use_cache = True
        unwrapped.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tok = copy.copy(tokenizer)  # load_tokenizer memoises: never mutate the shared instance
        if chat_template:
            tok.chat_template = chat_template
        tok.save_pretrained(str(tmp))
        names = sorted(p.name for p in tmp.iterdir())
        last = [n for n in ("adapter_config.json", "config.json") if n in names]
        for n in [n for n in names if n not in last] + last:
            dst = out / n
            if dst.is_dir():
                shutil.rmtree(dst)
            os.replace(tmp / n, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(out / "README.md", card)


class MetricsLog:
    """metrics.jsonl + TensorBoard, main process only."""

    def __init__(self, out: Path, active: bool, keep_rows: int | None, purge_step: int | None):
        self.active, self.rows = active, []
        self.path = out / METRICS_FILE
        self.f = self.tb = None
        if not active:
            return
        if keep_rows is not None and self.path.exists():
            # Rows written after the checkpoint belong to the part of the run that is being redone.
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_rows]
            self.path.write_text("".join(lines), encoding="utf-8")
            self.rows = [json.loads(x) for x in lines]
        self.f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / TB_DIR), purge_step=purge_step)
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            self.tb = None

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.active:
            return
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            tag = "eval" if "eval_loss" in row else "train"
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{tag}/{k}", v, row["step"])

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def config_yaml(d: dict) -> str:
    import yaml

    return "# Resolved imtune training config: `imtune train THIS_FILE --out NEW_DIR` repeats the run.\n" + \
        yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
