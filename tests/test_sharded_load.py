"""Shard-first loading (`training/sharded_load.py`, `models.StoredTensor`).

- the safetensors reader gives exactly the rows safetensors itself gives, in any dtype, and refuses bad headers;
- one process: the weights equal `from_pretrained`'s bit for bit (tied head, rotary table), the LoRA adapter equals
  what `get_peft_model` draws on a real model;
- 2 FSDP processes (one launch): every shard holds today's weights; loading raises a process' peak memory by about
  its share of the weights, not the whole model (the old path, `from_pretrained` then `fully_shard`, touches every
  row it shards and is read whole by the KL reference copy); the sharded KL reference gives the unsharded KL; LoRA
  with gradient checkpointing trains on the sharded model.
"""

import json
import textwrap

import pytest
import torch

from imtune.errors import ImtuneError
from tests import launching

FSDP_CPU = launching.ACCELERATE_CONFIGS / "fsdp_cpu.yaml"


def test_read_rows_matches_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from imtune.models import safetensors_index

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(7, 5, generator=g), "bf16": torch.randn(6, 3, generator=g).bfloat16(),
               "f16": torch.randn(5, generator=g).half(), "i64": torch.arange(12).reshape(4, 3),
               "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    index = safetensors_index(tmp_path)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        for name, t in tensors.items():
            st = index[name]
            assert (st.dtype, st.shape) == (t.dtype, tuple(t.shape))
            if t.dim() == 0:
                out = torch.empty((), dtype=t.dtype)
                st.read_rows(out)
                assert torch.equal(out, t)
                continue
            for start in range(t.shape[0]):
                for stop in range(start, t.shape[0] + 1):
                    same = torch.empty((stop - start, *t.shape[1:]), dtype=t.dtype)
                    st.read_rows(same, start)
                    assert torch.equal(same, f.get_slice(name)[start:stop])
            if t.is_floating_point():  # cast on the way in, as training reads bf16 checkpoints into fp32
                wide = torch.empty(tuple(t.shape), dtype=torch.float32)
                st.read_rows(wide)
                assert torch.equal(wide, t.float())
    (tmp_path / "m.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ImtuneError, match="m.safetensors: not a safetensors file"):
        safetensors_index(tmp_path)


def test_one_process_load_equals_from_pretrained(tiny_dir):
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from imtune.config import TrainConfig
    from imtune.models import empty_model, safetensors_index
    from imtune.training.sharded_load import _owners, load_causal_lm

    empty, path = empty_model(str(tiny_dir))
    assert _owners(empty, safetensors_index(path)) is not None  # read directly, not through from_pretrained
    cfg = TrainConfig(model=str(tiny_dir), lora=True, gradient_checkpointing=True, seed=7)
    torch.manual_seed(11)
    ours = load_causal_lm(cfg, Accelerator(cpu=True), sharded=False)
    torch.manual_seed(11)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32),
                            LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    base = ours.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied, one parameter
    assert torch.equal(base.model.rotary_emb.inv_freq, theirs.get_base_model().model.rotary_emb.inv_freq)
    assert base.is_gradient_checkpointing and not base.model.embed_tokens.weight.requires_grad


def test_sharded_checkpoint_reads_the_files_its_index_names(tiny_dir, tmp_path):
    """A checkpoint in several files (+ index), next to a stray copy the index does not name (as some Hub repos
    hold `consolidated.safetensors`): read from the indexed files, equal to from_pretrained."""
    import shutil

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from imtune.config import TrainConfig
    from imtune.training.sharded_load import load_causal_lm

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").rename(d / "consolidated.safetensors")
    plain.save_pretrained(str(d), max_shard_size="40KB")
    assert len(list(d.glob("model-*.safetensors"))) > 1
    ours = load_causal_lm(TrainConfig(model=str(d)), Accelerator(cpu=True), sharded=False)
    sd = plain.state_dict()
    assert all(torch.equal(t, sd[k]) for k, t in ours.state_dict().items())


DRIVER = textwrap.dedent("""
    import ctypes, gc, json, sys
    import torch
    from imtune.config import TrainConfig
    from imtune.training import distributed
    from imtune.training.loss import weighted_loss_sum
    from imtune.training.sharded_load import load_causal_lm
    from transformers import AutoModelForCausalLM

    model_dir, out = sys.argv[1], sys.argv[2]
    acc = distributed.make_accelerator(cpu=True)

    def kb(key):
        return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key + ":")) * 1024

    full = TrainConfig(model=model_dir, kl_coef=0.5)
    warm = load_causal_lm(full, acc, sharded=True)  # warm-up: imports and first-use allocations
    del warm
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    before = kb("VmRSS")
    model = load_causal_lm(full, acc, sharded=True)
    growth = kb("VmHWM") - before
    ref = load_causal_lm(full, acc, sharded=True, trainable=False)

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # today's weights
    sd = plain.state_dict()
    same = all(torch.equal(p.full_tensor(), sd[n]) for n, p in model.named_parameters())
    same_ref = all(torch.equal(p.full_tensor(), sd[n]) for n, p in ref.named_parameters())
    ref_frozen = not ref.training and not any(p.requires_grad for p in ref.parameters())
    local = sum(p.to_local().numel() for p in model.parameters())

    # KL against the sharded reference = KL against an unsharded one, once the model has moved off it.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "weights": torch.rand(2, 24, generator=g)}
    unsharded_ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for m in (model, plain):
            for p in m.parameters():
                p.mul_(1.25)
    kl = {}
    for kind in ("full", "target_token"):
        a = weighted_loss_sum(model, batch, kl_coef=0.5, kl_type=kind, ref_model=ref)
        b = weighted_loss_sum(plain, batch, kl_coef=0.5, kl_type=kind, ref_model=unsharded_ref)
        kl[kind] = [a.kl_sum, b.kl_sum, a.ce_sum, b.ce_sum]

    # LoRA + gradient checkpointing on the sharded model: the adapter is the unsharded one, and it trains.
    lora = TrainConfig(model=model_dir, lora=True, lora_dropout=0.0, gradient_checkpointing=True, seed=3)
    torch.manual_seed(3)  # as the recipe's set_seed before building the model
    sharded = load_causal_lm(lora, acc, sharded=True)
    torch.manual_seed(3)
    single = load_causal_lm(lora, acc, sharded=False)  # 2 processes, unsharded: through from_pretrained
    single_sd = single.state_dict()
    same_adapter = all(torch.equal(p.full_tensor(), single_sd[n]) for n, p in sharded.named_parameters()
                       if p.requires_grad)
    sharded.train()
    weighted_loss_sum(sharded, batch).loss_sum.backward()
    grads = [float(p.grad.full_tensor().abs().sum()) for n, p in sharded.named_parameters()
             if p.requires_grad and "lora_B" in n]
    json.dump({"growth": growth, "local": local, "total": sum(p.numel() for p in plain.parameters()),
               "same": same, "same_ref": same_ref, "ref_frozen": ref_frozen, "kl": kl,
               "same_adapter": same_adapter, "lora_B_grads": grads},
              open(f"{out}/rank{acc.process_index}.json", "w"))
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process FSDP launch of DRIVER on a ~50 MB model; {rank: its report} and the weights' size."""
    if launching.launcher() is None:
        pytest.skip("accelerate launcher not installed")
    from tests.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("sharded")
    make_tiny_model(d / "m", hidden_size=512, num_layers=6)
    (d / "driver.py").write_text(DRIVER)
    log = d / "launch.log"
    rc = launching.run(launching.command(["--config_file", str(FSDP_CPU)], [str(d / "driver.py"), str(d / "m"),
                                                                          str(d)]), log, timeout=300)
    assert rc == 0, launching.tail(log)
    size = sum(f.stat().st_size for f in (d / "m").glob("*.safetensors"))
    return {r: json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)}, size


@pytest.mark.slow
def test_shards_hold_todays_weights_and_load_only_their_share(two_ranks):
    reports, size = two_ranks
    assert sum(r["local"] for r in reports.values()) == reports[0]["total"]
    for r in reports.values():
        assert r["same"] and r["same_ref"] and r["ref_frozen"]
        print(f"\nloading raised this process' peak memory by {r['growth'] / size:.2f}x the weights ({size / 1e6:.0f} MB)")
        # Half the weights plus some slack; the old path (full from_pretrained, then fully_shard) reached ~1x.
        assert r["growth"] < 0.75 * size


@pytest.mark.slow
def test_sharded_kl_reference_equals_unsharded(two_ranks):
    for r in two_ranks[0].values():
        for kind, (kl, kl_plain, ce, ce_plain) in r["kl"].items():
            assert kl > 0, kind
            print(f"\n{kind} KL: sharded reference {kl:.8g}, unsharded {kl_plain:.8g}")
            assert kl == pytest.approx(kl_plain, rel=1e-5), kind
            assert ce == pytest.approx(ce_plain, rel=1e-6), kind


@pytest.mark.slow
def test_sharded_lora_with_gradient_checkpointing(two_ranks):
    for r in two_ranks[0].values():
        assert r["same_adapter"]
        assert r["lora_B_grads"] and all(g > 0 for g in r["lora_B_grads"])
