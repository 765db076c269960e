"""Fused kernels: the grouped fused linear + CE keeps imtune's exact weighted loss and gradients; `kernels` resolves
per device; padding-free rows give the padded loss through the fused backend too. GPU tests run Liger's real kernel
and skip without CUDA or liger-kernel."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imtune.errors import ImtuneError
from imtune.training import fast_defaults, kernels
from imtune.training.batching import collate, pack
from imtune.training.logprobs import _LogitTransform
from imtune.training.loss import _fused_head_loss, _Spec, weighted_loss_sum
from tests.test_training import base_cfg, write_data

# Objectives as their per-position weights at the scored (w > 0) positions: it/im are all-ones on the positions they
# select (they differ in which positions those are), weighted:λ mixes λ on the prompt with 1 on the response.
OBJECTIVE_WEIGHTS = {"it": (1.0,), "im": (1.0,), "weighted:0.1": (0.1, 1.0), "weighted:0.3:0.5": (0.3, 0.5, 1.0)}


def _independent_weighted_ce(h, weight, bias, y, w, softcap=None):
    x = F.linear(h, weight, bias)
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return (w * F.cross_entropy(x, y, reduction="none")).sum()


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 40), hdim=st.integers(1, 12), vocab=st.integers(2, 50), seed=st.integers(0, 2**16),
       objective=st.sampled_from(sorted(OBJECTIVE_WEIGHTS)), norm=st.sampled_from(["weight", "tokens"]),
       softcap=st.sampled_from([None, 5.0]))
def test_grouped_fused_ce_is_imtunes_weighted_loss_in_fp64(n, hdim, vocab, seed, objective, norm, softcap):
    """Loss AND gradients (hidden, lm_head weight and bias) equal an independent fp64 Σ w·CE to 1e-10 and imtune's
    own head loss (fp32 logits inside) to fp32 rounding, after the recipe's normaliser (Σ w or #weighted tokens)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hdim, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,), generator=g)
    choices = torch.tensor(OBJECTIVE_WEIGHTS[objective], dtype=torch.float64)
    w = choices[torch.randint(0, len(choices), (n,), generator=g)]
    z = max(1.0, float(w.sum()) if norm == "weight" else float(n))

    def fused(hh, ww, bb):
        return kernels.grouped_linear_ce(hh, ww, bb, y, w, softcap=softcap) / z

    def own(hh, ww, bb):
        spec = _Spec(7, _LogitTransform(cap=softcap), 0.0, "target_token")
        return _fused_head_loss(hh, ww, bb, y, w, None, spec)[0] / z

    def independent(hh, ww, bb):
        return _independent_weighted_ce(hh, ww, bb, y, w, softcap) / z

    lf, gf = _grads(fused, h, weight, bias)
    # imtune's own head computes its logits in fp32 whatever the input dtype, hence its looser tolerance.
    for ref, tol in ((independent, 1e-10), (own, 2e-5)):
        lr, gr = _grads(ref, h, weight, bias)
        torch.testing.assert_close(lf, lr.to(lf.dtype), rtol=tol, atol=tol)
        for a, b in zip(gf, gr, strict=True):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)


def test_grouped_fused_ce_calls_the_kernel_once_per_weight_and_never_on_weight_zero():
    calls = []

    def backend(_input, weight, target, bias=None, **kw):
        calls.append((target.tolist(), kw["reduction"]))
        return kernels.torch_linear_cross_entropy(_input, weight, target, bias, **kw)

    h, weight = torch.randn(5, 3), torch.randn(7, 3)
    y, w = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0.1, 1.0, 0.1, 1.0, 1.0])
    kernels.grouped_linear_ce(h, weight, None, y, w, backend=backend)
    assert sorted(calls) == [([1, 3], "sum"), ([2, 4, 5], "sum")]
    with pytest.raises(ValueError, match="distinct token weights"):
        kernels.grouped_linear_ce(torch.randn(40, 3), weight, None, torch.zeros(40, dtype=torch.long),
                                  torch.arange(1, 41.0), backend=backend)


def _tiny(tiny_dir, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=dtype).train()


class Ex:
    def __init__(self, ids, w):
        self.input_ids, self.weights, self.id = ids, w, "x"

    def __len__(self):
        return len(self.input_ids)


def _examples(vocab, lam=0.1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    exs = []
    for n in (9, 3, 14, 6):
        w = torch.tensor([0.0, lam, 1.0])[torch.randint(0, 3, (n,), generator=gen)].tolist()
        exs.append(Ex(torch.randint(5, vocab, (n,), generator=gen).tolist(), w))
    return exs


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    o = weighted_loss_sum(model, batch, chunk_size=5, **kw)
    o.loss_sum.backward()
    return o, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_backend_in_the_loss_engine_matches_the_default_on_a_model(tiny_dir, one_torch_thread, layout):
    """Through `weighted_loss_sum` on a tiny Llama in fp64: the grouped backend gives the default head's loss and
    every parameter's gradient (lm_head/embedding included), padded and padding-free alike."""
    model = _tiny(tiny_dir)
    exs = _examples(model.config.vocab_size)
    batch = collate(exs, pad_token_id=0) if layout == "padded" else pack(exs, 64)
    batch.pop("seq_lens", None)
    a, ga = _loss_and_grads(model, batch)
    b, gb = _loss_and_grads(model, batch, kernels="torch")
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "weights"}
    logits = model(**inputs, use_cache=False).logits  # fp64 throughout, unlike reference_weighted_ce's fp32
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none")
    full = (ce * batch["weights"][:, 1:].flatten().double()).sum()
    full.backward()
    gr = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert b.weight_sum == a.weight_sum and b.n_weighted == a.n_weighted and b.kl_sum == 0.0
    assert b.loss_sum.dtype == torch.float64
    torch.testing.assert_close(b.loss_sum, full.detach().double(), rtol=1e-10, atol=1e-10)
    # the default head computes its logits in fp32 whatever the model's dtype
    assert b.ce_sum == pytest.approx(a.ce_sum, rel=2e-6)
    assert ga.keys() == gb.keys() == gr.keys() and "model.embed_tokens.weight" in ga  # tied: the lm_head weight
    for k in ga:
        torch.testing.assert_close(gb[k], gr[k], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6)


def test_padding_free_rows_give_the_padded_loss_through_the_fused_backend(tiny_dir, one_torch_thread):
    model = _tiny(tiny_dir)
    exs = _examples(model.config.vocab_size, seed=4)
    padded = collate(exs, pad_token_id=0)
    packed = pack(exs, 64)
    packed.pop("seq_lens")
    a, ga = _loss_and_grads(model, padded, kernels="torch")
    b, gb = _loss_and_grads(model, packed, kernels="torch")
    assert b.ce_sum == pytest.approx(a.ce_sum, rel=1e-10) and b.weight_sum == pytest.approx(a.weight_sum)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-8, atol=1e-10)


def test_kl_keeps_imtunes_own_head_with_a_fused_backend(tiny_dir, one_torch_thread):
    import copy

    model = _tiny(tiny_dir)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)  # a model that differs from its reference, so the KL is not 0
    batch = collate(_examples(model.config.vocab_size), pad_token_id=0)
    kw = {"kl_coef": 0.2, "kl_type": "full", "ref_model": ref}
    a, ga = _loss_and_grads(model, batch, **kw)
    b, gb = _loss_and_grads(model, batch, kernels="torch", **kw)
    assert a.kl_sum > 0 and b.kl_sum == a.kl_sum and b.ce_sum == a.ce_sum
    for k in ga:
        assert torch.equal(ga[k], gb[k])


def test_many_distinct_weights_fall_back_to_the_chunked_head(tiny_dir, one_torch_thread):
    """Per-message weights can give a micro-batch more distinct weights than the grouped kernel takes: the loss
    then runs on imtune's own head (bit-identical to kernels none) instead of refusing; few weights keep the kernel."""
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return kernels.torch_linear_cross_entropy(*a, **kw)

    assert kernels.grouped_kernel_fits(torch.tensor([0.0, 0.1, 1.0, 1.0]))
    assert not kernels.grouped_kernel_fits(torch.arange(kernels.MAX_WEIGHT_GROUPS + 1.0))
    model = _tiny(tiny_dir)
    exs = _examples(model.config.vocab_size)
    for k, e in enumerate(exs):
        e.weights = [w * (1 + k + i / 10) for i, w in enumerate(e.weights)]  # ~30 distinct values
    batch = collate(exs, pad_token_id=0)
    assert not kernels.grouped_kernel_fits(batch["weights"])
    a, ga = _loss_and_grads(model, batch)
    old = kernels.BACKENDS["torch"]
    kernels.BACKENDS["torch"] = counting
    try:
        b, gb = _loss_and_grads(model, batch, kernels="torch")
        assert calls == []
        _loss_and_grads(model, collate(_examples(model.config.vocab_size), pad_token_id=0), kernels="torch")
        assert calls  # three weight values: the grouped kernel
    finally:
        kernels.BACKENDS["torch"] = old
    assert b.ce_sum == a.ce_sum and b.weight_sum == a.weight_sum
    for k in ga:
        assert torch.equal(ga[k], gb[k])


def test_lora_and_neftune_work_through_the_fused_backend(tiny_dir, one_torch_thread):
    """LoRA adapters on the body (lm_head stays a plain Linear, so the fused backend applies) and NEFTune's
    embedding noise (same seed, same noise): the fused backend gives the default head's loss and adapter gradients."""
    from peft import LoraConfig, get_peft_model

    from imtune.training.loss import neftune_hook

    model = get_peft_model(_tiny(tiny_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    assert type(model.get_base_model().lm_head) is torch.nn.Linear
    batch = collate(_examples(model.config.vocab_size, seed=7), pad_token_id=0)
    out = []
    with neftune_hook(model, 5.0):
        for backend in ("none", "torch"):
            torch.manual_seed(0)
            out.append(_loss_and_grads(model, batch, kernels=backend))
    (a, ga), (b, gb) = out
    assert b.ce_sum == pytest.approx(a.ce_sum, rel=2e-6)
    assert ga.keys() == gb.keys() and ga and all("lora_" in k for k in ga)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-7)


def test_bad_backend_name_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="kernels must be"):
        weighted_loss_sum(_tiny(tiny_dir, torch.float32), collate(_examples(50), 0), kernels="triton")


# ------------------------------------------------------------------------------------------------ resolution


def test_kernels_resolve_per_device():
    assert kernels.resolve_kernels("none", "cpu") == ("none", None)
    choice, why = kernels.resolve_kernels("auto", "cpu")
    assert choice == "none" and why.startswith("kernels auto: none (") and "cpu" in why
    with pytest.raises(ImtuneError, match="^kernels: liger cannot run here: .*cpu$"):
        kernels.resolve_kernels("liger", "cpu")
    with pytest.raises(ImtuneError, match="not one of"):
        kernels.resolve_kernels("triton", "cpu")


def test_varlen_attention_names():
    for name in ("flash_attention_2", "flash_attention_3", "flash_attention_4", "kernels-community/flash-attn2",
                 "kernels-community/vllm-flash-attn3"):
        assert fast_defaults.is_varlen_attention(name)
    for name in ("sdpa", "eager", "flex_attention"):
        assert not fast_defaults.is_varlen_attention(name)


def test_cpu_summary_says_why_kernels_and_padding_free_stay_off(tiny_dir):
    from imtune.config import TrainConfig

    model = _tiny(tiny_dir, torch.float32)
    cfg, fast = fast_defaults.resolve(TrainConfig(precision="fp32"), model, "cpu")
    line = fast.summary()
    assert cfg.kernels == "none" and fast.kernels == "none" and not fast.padding_free
    assert "kernels none" in line and "kernels auto: none (Liger kernels are Triton/CUDA only" in line
    assert "padding-free auto: off with sdpa attention (no variable-length kernel" in line


def test_kernels_liger_on_cpu_is_one_line_exit_2_and_leaves_nothing(tiny_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_cfg(tiny_dir, data, tmp_path / "out")
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if not isinstance(v, bool)]
    r = subprocess.run([sys.executable, "-m", "imtune.cli.main", "train", *argv, "--kernels", "liger"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "kernels: liger cannot run here" in lines[-1] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------------------ GPU


def _liger_ready() -> bool:
    return torch.cuda.is_available() and kernels.liger_installed()


@pytest.mark.skipif(not _liger_ready(), reason="needs a CUDA device and liger-kernel")
@pytest.mark.parametrize("objective", sorted(OBJECTIVE_WEIGHTS))
def test_liger_kernel_matches_the_unfused_head_in_bf16(objective):
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 300, 256, 4099
    h = torch.randn(n, hdim, generator=g).cuda()
    weight = (torch.randn(vocab, hdim, generator=g) * 0.05).cuda()
    y = torch.randint(0, vocab, (n,), generator=g).cuda()
    choices = torch.tensor(OBJECTIVE_WEIGHTS[objective])
    w = choices[torch.randint(0, len(choices), (n,), generator=g)].cuda()

    def liger(hh, ww):
        return kernels.grouped_linear_ce(hh, ww, None, y, w, backend=kernels.liger_linear_cross_entropy,
                                         compute_dtype=torch.bfloat16)

    def unfused(hh, ww):
        spec = _Spec(64, _LogitTransform(), 0.0, "target_token")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _fused_head_loss(hh, ww, None, y, w, None, spec)[0]

    la, ga = _grads(liger, h, weight)
    lb, gb = _grads(unfused, h, weight)
    torch.testing.assert_close(la.float(), lb.float(), rtol=2e-2, atol=1e-2)
    for a, b in zip(ga, gb, strict=True):
        scale = b.abs().max()
        assert float((a.float() - b.float()).abs().max()) <= 3e-2 * float(scale) + 1e-6


@pytest.fixture()
def restore_llama_module():
    """Liger's patches replace classes and functions of transformers' llama module for the whole process."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for k, v in saved.items():
        setattr(modeling_llama, k, v)


@pytest.mark.skipif(not _liger_ready(), reason="needs a CUDA device and liger-kernel")
def test_liger_training_loss_matches_the_unfused_loss_on_a_patched_model(tiny_dir, restore_llama_module):
    model = _tiny(tiny_dir, torch.float32).cuda()
    batch = {k: v.cuda() for k, v in collate(_examples(model.config.vocab_size), 0).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, ga = _loss_and_grads(model, batch)
    kernels.patch_model(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        b, gb = _loss_and_grads(model, batch, kernels="liger")
    assert b.ce_sum == pytest.approx(a.ce_sum, rel=2e-2)
    for k in ga:
        assert float((gb[k] - ga[k]).abs().max()) <= 5e-2 * float(ga[k].abs().max()) + 1e-6, k
