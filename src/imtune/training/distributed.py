"""Several processes: the Accelerator (with FSDP2 and DeepSpeed ZeRO on CPU too), workers that die with their
launcher, and the full state dict of a sharded model.

FSDP. `accelerate launch --config_file fsdp.yaml` sets `ACCELERATE_USE_FSDP` and the `FSDP_*` settings for every
process. accelerate 1.x only honours them on GPU-like devices: on a CPU-only machine the launch becomes plain
MULTI_CPU data parallelism over gloo and the FSDP settings are dropped without a word. FSDP2 (`fully_shard`)
itself runs on CPU over gloo, so `make_accelerator` promotes that state to FSDP. The model then goes through
accelerate's own `fsdp2_prepare_model`, FSDP-aware clipping and state-dict gathering, exactly as on GPUs; that is
what makes the CPU tests (tests/test_fsdp.py) a check of the path users run on GPUs.

With FSDP every parameter outside a forward pass is a DTensor shard. Two things follow:
- checkpoints are torch.distributed.checkpoint (DCP) directories, one file per process (`checkpointing.py`);
- the final model is gathered into one full state dict on the main process and saved from an unsharded copy
  built on the meta device (`unsharded_copy`), so `merge_and_unload` and `save_pretrained` see plain tensors.

DeepSpeed. `accelerate launch --config_file deepspeed_zero{2,3}.yaml` (ZeRO-2: AdamW state and gradients sharded;
ZeRO-3: the weights too). accelerate runs DeepSpeed only with `Accelerator(cpu=False)`; without a GPU the processes
meet over gloo (`InitProcessGroupKwargs(backend="gloo")`, DeepSpeed's CPU accelerator), which is what the CPU tests
(tests/test_deepspeed.py) run. imtune keeps its maths: DeepSpeed is told `gradient_accumulation_steps: 1`, so its
backward never rescales the loss, and `accelerator.sync_gradients` marks the last pass of an optimizer step, on which
DeepSpeed reduces (averaging over processes, like DDP), clips at the run's `max_grad_norm` and steps imtune's own
torch AdamW. Checkpoints are accelerate's `save_state` (DeepSpeed's engine checkpoint); the final model is gathered
with `accelerator.get_state_dict` (ZeRO-3's consolidated state dict, fp32 master weights) like FSDP's. ZeRO-3 loads
the model whole and lets `deepspeed.initialize` partition it (`zero3_init_flag: false`).

Launcher death. torchrun starts each worker in its own session, so `kill -9` of the launcher (or of
`accelerate launch`) leaves the workers running on their own: they would go on training and writing into the
output directory. Each worker therefore asks the kernel to SIGKILL it when its launcher dies; the run stops as a
whole and `--resume` continues from the last complete checkpoint.
"""

from __future__ import annotations

import copy
import os
import signal
import sys

import torch

from imtune.errors import ImtuneError
from imtune.io_utils import die_with_parent


def fsdp_requested() -> bool:
    """True inside a launch made with an FSDP accelerate config (accelerate's own environment flag)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def make_accelerator(cpu: bool, micro_batch_size: int = 1, max_grad_norm: float = 0.0):
    """The run's Accelerator; FSDP on CPU when the launch asked for FSDP, DeepSpeed ZeRO when it asked for DeepSpeed
    (see the module doc). `micro_batch_size` and `max_grad_norm` fill DeepSpeed's config."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    die_with_launcher()
    if deepspeed_requested():
        return _deepspeed_accelerator(cpu, micro_batch_size, max_grad_norm)
    accelerator = Accelerator(cpu=cpu)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
        _fsdp_over_gloo(accelerator)
    return accelerator


def _deepspeed_accelerator(cpu: bool, micro_batch_size: int, max_grad_norm: float):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, is_deepspeed_available

    if not is_deepspeed_available():
        raise ImtuneError("a DeepSpeed launch needs the deepspeed package: pip install 'imtune[deepspeed]'")
    # Accelerator(cpu=True) switches DeepSpeed off; without a GPU the processes meet over gloo instead (DeepSpeed's
    # CPU accelerator uses gloo when oneCCL is absent).
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu else []
    accelerator = Accelerator(kwargs_handlers=handlers)
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage == 3:
        if plugin.zero3_init_flag:
            raise ImtuneError("DeepSpeed ZeRO-3: set zero3_init_flag: false in the accelerate config (imtune loads the "
                              "model whole, then deepspeed.initialize partitions it; see deepspeed_zero3.yaml)")
        from transformers.integrations import unset_hf_deepspeed_config

        # accelerate hands the ZeRO-3 config to transformers whatever zero3_init_flag says, and from_pretrained
        # would then load straight into empty ZeRO-3 placeholders (no gather hooks until deepspeed.initialize).
        unset_hf_deepspeed_config()
    ds = plugin.deepspeed_config
    # imtune accumulates and normalises itself: DeepSpeed sees one micro-batch per optimizer step, so its backward
    # never divides by gradient_accumulation_steps; the step boundary comes from accelerator.sync_gradients.
    ds.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=1,
              gradient_clipping=max(max_grad_norm, 0.0))
    # The final save gathers ZeRO-3 shards through accelerator.get_state_dict, which needs this switch; the
    # gathered tensors keep the weights' own dtype (fp32 here: imtune keeps fp32 master weights).
    ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    return accelerator


def die_with_launcher() -> None:
    """Under torchrun / accelerate launch on Linux: SIGKILL this worker when the launcher process dies."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(signal.SIGKILL)


def _fsdp_over_gloo(accelerator) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
    if plugin.fsdp_version != 2:
        raise ImtuneError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (FSDP1 has no gloo path)")
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    # AcceleratorState re-reads PartialState's (shared) state whenever it is instantiated again, so both change.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    _return_freed_memory()


def _return_freed_memory() -> None:
    """On CPU, FSDP's all-gathered layers are host memory. glibc keeps freed blocks under its mmap threshold (which
    rises to 32 MiB by itself) in its arenas, so the buffers of every layer stay resident: 3 processes training a
    0.6B model peaked at 10.7 GB instead of 6.9 GB (bench/ranks.py). A fixed 1 MiB threshold returns them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    m_mmap_threshold = -3  # from <malloc.h>
    try:
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        return


def share_of_step(step: list[list[int]], rank: int, world: int, lockstep: bool) -> list[tuple[list[int], float]]:
    """This process' passes for one optimizer step: (micro-batch, 1.0), or (any micro-batch, 0.0) for a stand-in
    whose loss is multiplied by zero.

    Process r takes micro-batches r, r + world, ... Every process runs at least one pass, so that DDP's gradient
    all-reduce happens everywhere. Under FSDP (`lockstep`) every process runs the same number of passes: each
    forward and backward all-gathers and reduce-scatters, and a process with one pass fewer would leave the others
    waiting in a collective forever.
    """
    mine = [(mb, 1.0) for mb in step[rank::world]]
    n = -(-len(step) // world) if lockstep else max(len(mine), 1)
    return mine + [(step[0], 0.0)] * (n - len(mine))


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def zero_stage(accelerator) -> int | None:
    """DeepSpeed's ZeRO stage under a DeepSpeed launch, else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def layout(accelerator) -> str:
    """How checkpoints are written under this launch: `deepspeed`, `fsdp` or `plain` (checkpointing.py)."""
    return "deepspeed" if zero_stage(accelerator) is not None else "fsdp" if is_fsdp(accelerator) else "plain"


def params_sharded(accelerator) -> bool:
    """Parameters live as per-process shards (FSDP, ZeRO-3): saving gathers them, checks need every process."""
    return is_fsdp(accelerator) or zero_stage(accelerator) == 3


def full_state_dict(accelerator, model, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """Every process calls this (all-gathers); the main process gets the full state dict on CPU, others None.

    `trainable_only` (an adapter saved on its own) gathers only the parameters that train: the frozen base would
    cost the main process a whole copy of the weights for nothing."""
    if not (trainable_only and is_fsdp(accelerator)):
        sd = accelerator.get_state_dict(model)
        return sd if accelerator.is_main_process else None
    from torch.distributed.tensor import DTensor

    sd = {}
    for name, p in model.named_parameters():  # the same order everywhere: each full_tensor() is a collective
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if accelerator.is_main_process:
                sd[name] = full.cpu()
    return sd if accelerator.is_main_process else None


def unsharded_copy(model, state_dict: dict[str, torch.Tensor], adapter_only: bool = False):
    """A plain (unsharded) copy of the FSDP-wrapped `model` holding `state_dict`'s tensors, for saving
    (`adapter_only`: the state dict holds the trainable adapter alone).

    Built on the meta device, so no memory beyond the gathered state dict; the parameters are the state dict's
    own tensors. Non-persistent buffers (rotary tables) stay on meta: nothing that saves or merges reads them.
    """
    from torch.distributed.fsdp import FSDPModule

    from imtune.training.loss import causal_lm_of, peft_model_of

    base = causal_lm_of(model)
    # fully_shard swaps in a subclass (FSDPLlamaForCausalLM): build the model's own class.
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(base.config)
    if getattr(base, "generation_config", None) is not None:
        # The constructor derives one from the config; the checkpoint's own (eos ids, sampling defaults) is kept.
        plain.generation_config = copy.deepcopy(base.generation_config)
    peft = peft_model_of(model)
    if peft is not None:
        from peft import get_peft_model

        plain = get_peft_model(plain, peft.peft_config[peft.active_adapter], adapter_name=peft.active_adapter)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    # An adapter gathered alone (full_state_dict's trainable_only) leaves the frozen base on meta: never saved.
    missing = [k for k in missing if k not in _tied_names(plain) and (k in trainable or not adapter_only)]
    if missing or unexpected:
        raise RuntimeError(f"gathered FSDP state dict does not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    return plain


def _tied_names(model) -> set[str]:
    # Tied parameters appear once in named_parameters() but under both names in state_dict().
    named = {n for n, _ in model.named_parameters(remove_duplicate=True)}
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - named
