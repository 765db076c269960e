"""Training checkpoints: atomic, self-describing, enough to continue a run bit for bit.

A checkpoint is a directory `<out>/checkpoints/checkpoint-<step>/` holding

    weights.safetensors   the trainable parameters only: every weight for full fine-tuning, the adapter for LoRA
    optimizer.pt          AdamW state
    scheduler.pt          LR scheduler state
    rng_state_<rank>.pt   python, numpy, torch (and CUDA) generator states of each process
    trainer_state.json    global step, where in the data order to continue (epoch, step in epoch), metrics rows
                          written so far, the config it was saved with and the fingerprint of its training data;
                          written last, so its presence marks a complete checkpoint

Under FSDP (see distributed.py) the first two are replaced by `sharded/`, a torch.distributed.checkpoint directory:
each process writes its own shards of the trainable parameters and their AdamW state (`__<rank>_0.distcp`) and
the main process writes `.metadata`. DCP re-shards on load, so a run may resume on another number of processes as
long as the global batch is the same.

It is written into `.tmp-checkpoint-<step>/` and renamed into place, so a run killed mid-save leaves a temp
dir that is ignored (and cleaned up) rather than a checkpoint that looks complete. With several processes the
directory must be on a file system they all see.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imtune.errors import ImtuneError
from imtune.inputs import load_input, read_json_object
from imtune.io_utils import fsync_tree, write_error_reason

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
SHARDED_DIR = "sharded"
DEEPSPEED_DIR = "deepspeed"
_NAME = re.compile(r"checkpoint-(\d+)$")
_TMP = ".tmp-checkpoint-"


@dataclass
class TrainerState:
    global_step: int
    epoch: int  # epoch of the next step to run
    step_in_epoch: int  # index of the next optimizer step within that epoch's plan
    metrics_rows: int  # lines of metrics.jsonl written up to this checkpoint
    world_size: int
    config: dict
    data_fingerprint: str | None = None  # of --data (records.sources); absent from checkpoints of older versions


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / CHECKPOINTS


def checkpoint_path(out: Path, global_step: int) -> Path:
    return checkpoint_dir(out) / f"checkpoint-{global_step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    d = checkpoint_dir(out)
    found = []
    for p in d.iterdir() if d.is_dir() else ():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(out: Path, resume: str) -> Path:
    """`resume` is 'latest' (newest complete checkpoint in `out`) or a checkpoint directory."""
    if resume in ("latest", "last", "true", "True"):
        found = list_checkpoints(out)
        if not found:
            raise ImtuneError(f"--resume: no checkpoint in {checkpoint_dir(out)}")
        return found[-1]
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        if (p / CHECKPOINTS).is_dir():
            return find_checkpoint(p, "latest")
        raise ImtuneError(f"--resume: {p} is not a complete checkpoint (no {STATE_FILE})")
    return p


def _trainable_state(model) -> dict[str, torch.Tensor]:
    # named_parameters() skips the second name of tied weights, which safetensors would refuse to store twice.
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, state: TrainerState, model, optimizer, scheduler, accelerator,
                    layout: str = "plain", save_total_limit: int = 0) -> Path:
    """Every process calls this (collective under FSDP and DeepSpeed); the main process owns the directory.
    `layout`: `plain`, `fsdp` or `deepspeed` (`distributed.layout`)."""
    out = Path(out)
    final = checkpoint_path(out, state.global_step)
    # One temp name for all ranks: the pid would differ, so it is keyed by the main process' choice via the step.
    tmp = checkpoint_dir(out) / f"{_TMP}{state.global_step:06d}"
    try:
        _write_checkpoint(tmp, state, model, optimizer, scheduler, accelerator, layout)
        if accelerator.is_main_process:
            fsync_tree(tmp)  # on disk before the rename makes it a checkpoint --resume trusts
            if final.exists():  # same step saved twice (e.g. a resumed run): the newer one wins
                (final / STATE_FILE).unlink(missing_ok=True)  # first: a kill mid-removal leaves nothing trusted
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            prune(out, save_total_limit)
    except Exception as e:  # a full disk: no half-written checkpoint stays, and the error is one line
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = write_error_reason(e)
        if reason is None:
            raise
        raise ImtuneError(f"cannot write the checkpoint {final}: {reason}") from None
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(tmp: Path, state: TrainerState, model, optimizer, scheduler, accelerator, layout: str) -> None:
    """Every file of the checkpoint into `tmp`, the trainer state last (its presence marks it complete)."""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if layout == "deepspeed":
        _save_deepspeed(tmp, accelerator)
    else:
        torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        if layout == "fsdp":
            _save_sharded(tmp / SHARDED_DIR, model, optimizer)
        elif accelerator.is_main_process:
            _write_weights(tmp, accelerator.unwrap_model(model))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_state(tmp, state)


def _save_deepspeed(tmp: Path, accelerator) -> None:
    # accelerate's own checkpoint: DeepSpeed's engine checkpoint (ZeRO shards of weights and AdamW state), each
    # process' RNG streams and the objects registered with register_for_checkpointing (the LR schedule).
    # Frozen weights (the base model under LoRA) never change: they come from --model, as in the other layouts.
    accelerator.save_state(str(tmp / DEEPSPEED_DIR), exclude_frozen_parameters=True)


def _write_weights(tmp: Path, model) -> None:
    from safetensors.torch import save_file

    save_file(_trainable_state(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})


def write_state(tmp: Path, state: TrainerState) -> None:
    # Written last: its presence is what marks the checkpoint complete.
    (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1, default=str) + "\n", encoding="utf-8")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(out: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all); also remove temp dirs left by killed saves."""
    d = checkpoint_dir(out)
    for p in d.glob(f"{_TMP}*") if d.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in list_checkpoints(out)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def read_state(ckpt: Path) -> TrainerState:
    try:
        return TrainerState(**read_json_object(Path(ckpt) / STATE_FILE, "trainer state"))
    except TypeError as e:
        raise ImtuneError(f"{ckpt}: unreadable {STATE_FILE} ({e})") from None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, accelerator, layout: str = "plain") -> TrainerState:
    """Restore weights, optimizer, scheduler and this process' RNG state; returns where to continue."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    _check_layout(ckpt, layout)
    if layout == "deepspeed":
        if state.world_size != accelerator.num_processes:
            raise ImtuneError(f"{ckpt}: a DeepSpeed checkpoint of {state.world_size} process(es) resumes on as many "
                              f"(this launch has {accelerator.num_processes})")
        try:
            # Not strict: the frozen weights are absent by design (_save_deepspeed); the trainable ones come back
            # from the ZeRO partitions, whose sizes DeepSpeed checks against this model's.
            accelerator.load_state(str(ckpt / DEEPSPEED_DIR), load_module_strict=False)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises several kinds for a checkpoint that does not fit
            raise ImtuneError(f"{ckpt}: cannot load the DeepSpeed checkpoint into this model "
                              f"({(str(e).splitlines() or [type(e).__name__])[0]}); was it saved with other "
                              f"--lora / --model settings?") from None
        return state
    if layout == "fsdp":
        _load_sharded(ckpt / SHARDED_DIR, model, optimizer)
    else:
        _load_weights(ckpt, accelerator.unwrap_model(model))
        load_input(ckpt / "optimizer.pt", "optimizer state", lambda p: optimizer.load_state_dict(_torch_load(p)))
    load_input(ckpt / "scheduler.pt", "scheduler state", lambda p: scheduler.load_state_dict(_torch_load(p)))
    rank = accelerator.process_index
    rng_file = ckpt / f"rng_state_{rank}.pt"
    if not rng_file.is_file():
        # Resuming on more processes than saved: fall back to rank 0's streams (data order is unaffected).
        rng_file = ckpt / "rng_state_0.pt"
    load_input(rng_file, "RNG state", lambda p: set_rng_state(_torch_load(p)))
    return state


def _torch_load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


_LAYOUT_MARK = {"fsdp": SHARDED_DIR, "deepspeed": DEEPSPEED_DIR, "plain": WEIGHTS_FILE}
_LAUNCH = {"fsdp": "an FSDP launch", "deepspeed": "a DeepSpeed launch", "plain": "a launch without FSDP or DeepSpeed"}


def _check_layout(ckpt: Path, layout: str) -> None:
    """One line when the checkpoint was written by another kind of launch than this one."""
    if (ckpt / _LAYOUT_MARK[layout]).exists():
        return
    saved = next((k for k, mark in _LAYOUT_MARK.items() if (ckpt / mark).exists()), None)
    what = f"saved under {_LAUNCH[saved]}" if saved else "holds no weights"
    raise ImtuneError(f"{ckpt}: {what}; resume it with the launch it was saved with")


def _load_weights(ckpt: Path, model) -> None:
    from safetensors.torch import load_file

    sd = load_input(ckpt / WEIGHTS_FILE, "checkpoint weights", load_file)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(sd) != trainable:
        missing, extra = sorted(trainable - set(sd)), sorted(set(sd) - trainable)
        raise ImtuneError(f"{ckpt}: checkpoint does not match the model being trained (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); was it saved with other --lora / --model settings?")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, t in sd.items():
            params[n].copy_(t)


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Frozen weights (the base model under LoRA) never change: they come from --model, as without FSDP.
    opts = StateDictOptions(ignore_frozen_params=True)
    msd, osd = get_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=opts)
    return {"model": msd, "optimizer": osd}


def _save_sharded(d: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(d))


def _load_sharded(d: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _dcp_state(model, optimizer)  # the layout to load into; DCP fills it in place
    try:
        dcp.load(state, checkpoint_id=str(d))
    except Exception as e:  # noqa: BLE001 - DCP wraps per-rank failures in several exception types
        raise ImtuneError(f"{d}: cannot load the sharded checkpoint into this model ({str(e).splitlines()[0]}); "
                          f"was it saved with other --lora / --model settings?") from None
    # strict=False: the frozen weights are absent by design; DCP has already checked every key it loaded.
    set_state_dict(model, getattr(optimizer, "optimizer", optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
