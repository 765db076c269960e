"""The model to train, loaded shard-first: every parameter read from the safetensors files straight into the
process' own memory for it, so N processes hold about one copy of the weights between them, not N.

    build on the meta device (`models.empty_model`; rotary tables and other computed buffers are real)
    -> LoRA (peft wraps the meta model; the adapter is then made real and initialised from the run's seed)
    -> FSDP2: `fully_shard` every decoder layer, embeddings/head and the root, exactly as `accelerator.prepare`
       would (accelerate's own `fsdp2_prepare_model`), still on meta
    -> fill: each process reads only the rows of each tensor that its shard holds (FSDP2 shards dim 0, in
       `torch.chunk` pieces), with `StoredTensor.read_rows`; one process without FSDP reads every row.

Tied embeddings stay one parameter (both owners get the same new one). The frozen KL reference is built the same
way (sharded like the model, no gradients, eval mode). Checkpoints whose tensor names differ from the model's
(transformers converts some on load) and launches where every process holds the whole model anyway (DDP,
DeepSpeed) go through `from_pretrained`, which maps the files lazily so the processes share the page cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imtune.config import TrainConfig
from imtune.errors import ImtuneError


def load_causal_lm(cfg: TrainConfig, accelerator, *, sharded: bool, trainable: bool = True) -> nn.Module:
    """The model to train (`trainable`: with LoRA and gradient checkpointing as configured) or the frozen
    reference; FSDP2-sharded when `sharded`. Weights are read once, by the process that keeps them."""
    from imtune import models

    direct = sharded or accelerator.num_processes == 1
    owners = None
    if direct:
        model, path = models.empty_model(cfg.model, "float32", cfg.trust_remote_code, cfg.revision)
        owners = _owners(model, models.safetensors_index(path))
    if owners is None:  # names transformers converts, or DDP/DeepSpeed: the lazily mapped from_pretrained
        model = models.load_model(cfg.model, dtype="float32", trust_remote_code=cfg.trust_remote_code,
                                  revision=cfg.revision)
    _set_attention(model, cfg.attn_implementation)
    if not trainable:
        model.requires_grad_(False)
    elif cfg.lora:
        model = _wrap_lora(model, cfg)
    if trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    if sharded:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(accelerator, model)
    if owners is not None:
        _fill(owners, accelerator.device if sharded else torch.device("cpu"))
    return model if trainable else model.eval()


def _set_attention(model, name: str | None) -> None:
    if name:
        try:
            model.set_attn_implementation(name)
        except (ValueError, ImportError) as e:
            raise ImtuneError(f"attn_implementation {name!r}: {e}") from None


def _owners(model: nn.Module, index: dict) -> list[tuple[nn.Module, str, object]] | None:
    """(module, attribute, stored tensor) for every parameter and persistent buffer the files hold; None when a
    parameter is missing under all its names (tied parameters have several) or its shape or dtype differs."""
    found: dict[int, object] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        st = index.get(name)
        if st is not None and st.dtype is not None and st.shape == tuple(p.shape):
            found.setdefault(id(p), st)
    if any(id(p) not in found for p in model.parameters()):
        return None
    out = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                out.append((mod, attr, found[id(p)]))
        for attr, b in mod._buffers.items():
            st = index.get(prefix + attr)
            if (b is not None and attr not in mod._non_persistent_buffers_set and st is not None
                    and st.dtype is not None and st.shape == tuple(b.shape)):
                out.append((mod, attr, st))
    return out


def _fill(owners: list, device: torch.device) -> None:
    """Make every meta parameter (or FSDP2 shard of one) real and read its rows from the files."""
    new: dict[int, nn.Parameter] = {}  # old parameter -> its real one, so tied owners keep sharing it
    for mod, attr, st in owners:
        if attr in mod._buffers:
            st.read_rows(mod._buffers[attr])
            continue
        p = mod._parameters[attr]
        if id(p) not in new:
            new[id(p)] = _real(p, st, device) if _is_meta(p) else p
        mod._parameters[attr] = new[id(p)]


def _is_meta(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return (p.to_local() if isinstance(p, DTensor) else p).is_meta


def _real(p: nn.Parameter, st, device: torch.device) -> nn.Parameter:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        t = torch.empty(tuple(p.shape), dtype=p.dtype, device=device)
        st.read_rows(t)
        return nn.Parameter(t, requires_grad=p.requires_grad)
    mesh, local_shape = p.device_mesh, tuple(p.to_local().shape)
    if tuple(p.placements) != (Shard(0),) or mesh.ndim != 1:
        raise ImtuneError(f"shard-first loading expects FSDP2's dim-0 sharding, not {p.placements}")
    # fully_shard cuts dim 0 as torch.chunk does: pieces of ceil(n / world) rows, the last ones shorter or empty.
    n, piece = p.shape[0], math.ceil(p.shape[0] / mesh.size())
    start = min(mesh.get_local_rank() * piece, n)
    if local_shape[0] != min(piece, n - start):
        raise ImtuneError(f"unexpected FSDP shard of {tuple(p.shape)}: {local_shape}")
    local = torch.empty(local_shape, dtype=p.dtype, device=device)
    st.read_rows(local, start)
    d = DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return nn.Parameter(d, requires_grad=p.requires_grad)


def _wrap_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules.strip()
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    rng = torch.get_rng_state()
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise ImtuneError(f"lora_target_modules {cfg.lora_target_modules!r}: {e}") from None
    _init_adapter(model, rng)
    return model


def _init_adapter(model: nn.Module, rng: torch.Tensor) -> None:
    """Make the adapter real and give it the values `get_peft_model` gives it on a real model.

    On a meta base peft still draws the adapter's initial values on the CPU, then moves them to meta with the
    base. So the draws are replayed from the RNG state peft started with, in its order: per adapted layer the
    construction of lora_A and lora_B (nn.Linear's own init), then A's Kaiming init (B is zero). Every process
    and every loading path gets the same adapter, the one earlier imtune versions gave for the seed
    (tests/test_sharded_load.py compares it with peft on a real model)."""
    from peft.tuners.lora import LoraLayer

    init = model.peft_config[model.active_adapter].init_lora_weights
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        for m in model.modules():
            if not isinstance(m, LoraLayer):
                continue
            for adapter in m.active_adapters:
                if adapter in m.lora_embedding_A:
                    raise ImtuneError("LoRA on embedding layers is not supported; name linear layers in "
                                      "lora_target_modules")
                for part in (m.lora_A[adapter], m.lora_B[adapter]):
                    part.to_empty(device="cpu")
                    part.reset_parameters()
                m.reset_lora_parameters(adapter, init)
