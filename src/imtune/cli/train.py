"""`imtune train [config.yaml] [--option value ...]`: fine-tune with the chosen per-token objective."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

from imtune.config import add_config_arguments, config_from_args
from imtune.errors import ImtuneError
from imtune.inputs import stat_input

EXAMPLES = """examples:
  imtune train --data lima.jsonl --objective im --out runs/lima-im
  imtune train cpu_small --objective it --out runs/lima-it          (a packaged config, see below)
  imtune train my.yaml --lr 1e-5 --max-steps 100 --out runs/x       (flags override the YAML file)
  imtune train my.yaml --out runs/x --resume                        (continue from the latest checkpoint)
  accelerate launch --num_processes 2 -m imtune.cli.main train my.yaml   (several GPUs / processes)

packaged configs: {configs}
"""


def packaged_configs() -> dict[str, Path]:
    d = Path(__file__).resolve().parents[1] / "configs"
    return {p.stem: p for p in sorted(d.glob("*.yaml"))}


def resolve_config_path(name: str) -> Path:
    p = Path(name)
    st = stat_input(p)
    if st is not None and (not stat.S_ISDIR(st.st_mode) or p.suffix in (".yaml", ".yml")):
        return p  # reading it says what else is wrong with it (a FIFO, a device, a directory named .yaml)
    packaged = packaged_configs()
    if name in packaged:
        return packaged[name]
    if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
        raise ImtuneError(f"{name}: config file not found")
    raise ImtuneError(f"{name}: no such config file or packaged config (packaged: {', '.join(packaged)})")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a model (full or LoRA) with the it / im / weighted objective",
        usage="imtune train [CONFIG] [--option VALUE ...]",
        description="Fine-tune a causal LM with exact per-token loss weights. Options come from the dataclass "
                    "imtune.config.TrainConfig: a YAML file sets any of them, flags override the file.",
        epilog=EXAMPLES.format(configs=", ".join(packaged_configs()) or "none"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config file or packaged config name (options not given keep their defaults)")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    path = resolve_config_path(args.config) if args.config else None
    cfg = config_from_args(args, str(path) if path else None).validate()  # before the seconds of importing torch
    from imtune.training.recipe import train

    train(cfg)
    _leave_process_group()  # after a success only: on a failure a peer may be stuck in a collective
    return 0


def _leave_process_group() -> None:
    """A launched process leaves its process group before the interpreter exits: torn down at exit instead, its
    communication threads (gloo, DeepSpeed's) can abort the process after a successful run (seen under ZeRO-3)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
