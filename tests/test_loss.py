"""The token log-prob engine against the plain full-logits computation: weighted_loss_sum (training), score_weighted
(held-out / per-example loss), score_tokens on prefix-shared rows (benchmarks); KL terms, NEFTune."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imtune.training import loss as L
from imtune.training.batching import collate, collate_prefix_rows, pack
from imtune.training.logprobs import score_tokens, score_weighted
from imtune.training.loss import neftune_hook, reference_weighted_ce, weighted_loss_sum


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def base(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="sdpa")


@pytest.fixture
def model(base):
    return copy.deepcopy(base).train()


@pytest.fixture(params=["fused", "checkpoint"])
def impl(request, monkeypatch):
    """Run each test on both head paths: the fused Linear fast path and the generic checkpointed one."""
    if request.param == "checkpoint":
        monkeypatch.setattr(L, "_plain_weight", lambda head: None)
    return request.param


class Ex:
    def __init__(self, ids, w):
        self.input_ids, self.weights = list(ids), list(w)


def random_examples(gen, vocab, lengths, p_zero=0.6):
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=gen).tolist()
        w = torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) > p_zero)
        w[0] = 0
        out.append(Ex(ids, w.tolist()))
    return out


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


def ours_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = weighted_loss_sum(model, batch, **kw)
    out.loss_sum.backward()
    return out, grads(model)


def reference_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits
    ref = reference_weighted_ce(logits, batch["input_ids"], batch["weights"])
    ref.backward()
    return ref.detach(), grads(model)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_padded_batch_matches_reference(model, impl, chunk):
    gen = torch.Generator().manual_seed(1)
    batch = collate(random_examples(gen, model.config.vocab_size, [23, 9, 16, 2]), pad_token_id=0)
    out, g = ours_and_grads(model, batch, chunk_size=chunk)
    ref, g_ref = reference_and_grads(model, batch)
    w = batch["weights"]
    assert out.loss_sum.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-6)
    assert out.ce_sum == pytest.approx(ref.item(), abs=1e-5, rel=1e-6)
    assert out.weight_sum == pytest.approx(w.sum().item(), rel=1e-6)
    assert out.n_weighted == int((w > 0).sum())
    assert out.kl_sum == 0.0
    assert_grads_close(g, g_ref)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_packed_row_matches_examples_run_separately(model, impl, chunk):
    gen = torch.Generator().manual_seed(2)
    exs = random_examples(gen, model.config.vocab_size, [11, 1, 6, 14])
    batch = pack(exs, max_length=64)
    out, g = ours_and_grads(model, batch, chunk_size=chunk)
    # Reference: each example alone, its own first-token weight forced to 0 exactly as pack() does.
    model.zero_grad(set_to_none=True)
    total = 0.0
    for e in exs:
        ids = torch.tensor([e.input_ids])
        w = torch.tensor([[0.0] + e.weights[1:]])
        total = total + reference_weighted_ce(model(input_ids=ids).logits, ids, w)
    total.backward()
    assert out.loss_sum.item() == pytest.approx(total.item(), abs=1e-5, rel=1e-6)
    assert_grads_close(g, grads(model))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4), chunk=st.integers(1, 40),
       p_zero=st.sampled_from([0.0, 0.5, 0.95]), seed=st.integers(0, 2**16))
def test_random_batches_match_reference(model, lengths, chunk, p_zero, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = collate(random_examples(gen, model.config.vocab_size, lengths, p_zero), pad_token_id=0)
    out, g = ours_and_grads(model, batch, chunk_size=chunk)
    ref, g_ref = reference_and_grads(model, batch)
    assert out.loss_sum.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-6)
    assert_grads_close(g, g_ref)


def test_micro_batches_sum_to_the_big_batch(model, impl):
    gen = torch.Generator().manual_seed(3)
    exs = random_examples(gen, model.config.vocab_size, [5, 17, 9, 12, 3, 8])
    big, g_big = ours_and_grads(model, collate(exs, 0), chunk_size=4)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for part in (exs[:1], exs[1:4], exs[4:]):
        out = weighted_loss_sum(model, collate(part, 0), chunk_size=4)
        out.loss_sum.backward()  # gradients accumulate across micro-batches
        total += out.loss_sum.item()
    assert total == pytest.approx(big.loss_sum.item(), rel=1e-6, abs=1e-5)
    assert_grads_close(grads(model), g_big)


def test_batch_without_weighted_tokens(model, impl):
    batch = collate([Ex([5, 6, 7], [0, 0, 0]), Ex([8, 9], [0, 0])], 0)
    out, g = ours_and_grads(model, batch)
    assert out.loss_sum.item() == 0.0 and out.n_weighted == 0 and out.weight_sum == 0.0
    assert all(float(v.abs().max()) == 0.0 for v in g.values())


def test_frozen_head_and_no_grad(model):
    gen = torch.Generator().manual_seed(4)
    batch = collate(random_examples(gen, model.config.vocab_size, [10, 7]), 0)
    ref, _ = reference_and_grads(model, batch)
    with torch.no_grad():
        assert weighted_loss_sum(model, batch).loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)
    model.get_output_embeddings().weight.requires_grad_(False)  # tied: the embedding is frozen too
    out, g = ours_and_grads(model, batch)
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)
    assert "lm_head.weight" not in g and "model.embed_tokens.weight" not in g
    assert "model.norm.weight" in g


def test_bf16_close_to_reference(model):
    model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    batch = collate(random_examples(gen, model.config.vocab_size, [30, 20]), 0)
    out = weighted_loss_sum(model, batch, chunk_size=8)
    out.loss_sum.backward()
    ref = reference_weighted_ce(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                batch["input_ids"], batch["weights"])
    assert out.loss_sum.dtype == torch.float32
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-2)


# ------------------------------------------------------------------------------------- other architectures

def _tiny(kind):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GraniteConfig

    common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if kind == "gemma3-softcap":
        cfg = Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=2.0, sliding_window=4,
                               attn_implementation="sdpa")
    else:
        cfg = GraniteConfig(**common, logits_scaling=4.0, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # make the logits large enough for the transform to matter
        m.get_output_embeddings().weight.mul_(20.0)
    return m.train()


@pytest.mark.parametrize("kind", ["gemma3-softcap", "granite-scaled-untied"])
def test_logit_transforms_match_reference(kind, impl):
    m = _tiny(kind)
    gen = torch.Generator().manual_seed(6)
    batch = collate(random_examples(gen, 300, [12, 7]), 0)
    out, g = ours_and_grads(m, batch, chunk_size=5)
    ref, g_ref = reference_and_grads(m, batch)
    assert out.loss_sum.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    assert_grads_close(g, g_ref, atol=1e-5, rtol=1e-4)
    pack_out = weighted_loss_sum(m, pack(random_examples(gen, 300, [6, 9]), 32))
    assert torch.isfinite(pack_out.loss_sum)


def test_unknown_logit_postprocessing_is_refused(model, monkeypatch):
    from imtune.training import logprobs

    monkeypatch.setattr(logprobs, "_logit_transform", lambda lm: logprobs._LogitTransform(scale=3.0))
    with pytest.raises(NotImplementedError, match="post-processing"):
        weighted_loss_sum(model, collate([Ex([5, 6, 7, 8], [0, 1, 1, 1])], 0))


def test_end_to_end_with_encode(model, tiny_tok):
    from imtune import encode
    from imtune.records.conversation import Conversation

    convs = [Conversation.from_messages([{"role": "user", "content": "What is 2 + 2?"},
                                         {"role": "assistant", "content": "The answer is 4."}], id=str(i))
             for i in range(3)]
    for objective in ("it", "im"):
        enc = encode(convs, tiny_tok, objective, template="chatml", max_length=64)
        batch = collate(enc, tiny_tok.pad_token_id)
        out = weighted_loss_sum(model, batch)
        ref, _ = reference_and_grads(model, batch)
        assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)
        assert out.n_weighted == sum(sum(w > 0 for w in e.weights) for e in enc)


# ---------------------------------------------------------------------------------------------------- KL

def direct_kl(model, ref_model, batch, kl_type):
    """Σ_{w>0} w·KL_t on full logits, written out plainly."""
    kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    ids = batch["input_ids"]
    logp = model(input_ids=ids, use_cache=False, **kw).logits[:, :-1].float().log_softmax(-1)
    with torch.no_grad():
        ref_model.eval()
        logq = ref_model(input_ids=ids, use_cache=False, **kw).logits[:, :-1].float().log_softmax(-1)
    w = batch["weights"][:, 1:]
    y = ids[:, 1:, None]
    if kl_type == "full":
        k = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    else:
        d = logq.gather(-1, y).squeeze(-1) - logp.gather(-1, y).squeeze(-1)
        k = torch.exp(d) - 1 - d if kl_type == "target_token" else -d
    return (w * k).sum()


@pytest.mark.parametrize("kl_type", L.KL_TYPES)
def test_kl_zero_against_itself(model, impl, kl_type):
    gen = torch.Generator().manual_seed(7)
    batch = collate(random_examples(gen, model.config.vocab_size, [14, 9]), 0)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    plain = weighted_loss_sum(model, batch)
    out = weighted_loss_sum(model, batch, kl_coef=0.5, kl_type=kl_type, ref_model=ref_model, chunk_size=6)
    assert abs(out.kl_sum) < 1e-5
    assert out.loss_sum.item() == pytest.approx(plain.loss_sum.item(), abs=1e-5)


def perturbed(model, seed=8, scale=0.05):
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return m.train()


@pytest.mark.parametrize("kl_type", L.KL_TYPES)
def test_kl_matches_direct_computation(model, impl, kl_type):
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pol = perturbed(model)
    gen = torch.Generator().manual_seed(9)
    batch = collate(random_examples(gen, pol.config.vocab_size, [15, 8, 11]), 0)
    c = 0.3
    out, g = ours_and_grads(pol, batch, kl_coef=c, kl_type=kl_type, ref_model=ref_model, chunk_size=4)
    pol.zero_grad(set_to_none=True)
    kl = direct_kl(pol, ref_model, batch, kl_type)
    ce, _ = reference_and_grads(pol, batch)  # leaves CE grads in .grad
    kl.mul(c).backward()  # adds the KL grads
    assert out.kl_sum == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    if kl_type != "target_token_k1":
        assert out.kl_sum > 1e-4
    assert out.loss_sum.item() == pytest.approx(ce.item() + c * kl.item(), rel=1e-5)
    assert_grads_close(g, grads(pol), atol=2e-5, rtol=1e-4)


def test_kl_full_on_packed_rows(model):
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pol = perturbed(model)
    gen = torch.Generator().manual_seed(10)
    batch = pack(random_examples(gen, pol.config.vocab_size, [9, 4, 12]), 32)
    out = weighted_loss_sum(pol, batch, kl_coef=1.0, kl_type="full", ref_model=ref_model, chunk_size=3)
    assert out.kl_sum == pytest.approx(direct_kl(pol, ref_model, batch, "full").item(), rel=1e-4)


@pytest.mark.parametrize("lora_head", [False, True])
@pytest.mark.parametrize("kl_type", ["full", "target_token"])
def test_lora_adapter_disabled_equals_frozen_base(base, kl_type, lora_head):
    from peft import LoraConfig, get_peft_model

    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if lora_head else [])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(base), cfg).train()
    gen = torch.Generator().manual_seed(11)
    batch = collate(random_examples(gen, base.config.vocab_size, [13, 10]), 0)

    a, g_a = ours_and_grads(pm, batch, kl_coef=0.7, kl_type=kl_type, ref_adapter_disabled=True, chunk_size=5)
    b, g_b = ours_and_grads(pm, batch, kl_coef=0.7, kl_type=kl_type, ref_model=frozen, chunk_size=5)
    assert a.kl_sum > 1e-5
    assert a.kl_sum == pytest.approx(b.kl_sum, rel=1e-5)
    assert a.loss_sum.item() == pytest.approx(b.loss_sum.item(), rel=1e-6)
    assert_grads_close(g_a, g_b)
    assert all(pm.training == m.training for m in pm.modules())  # train flags restored after the ref pass
    ce, _ = reference_and_grads(pm, batch)
    assert a.ce_sum == pytest.approx(ce.item(), rel=1e-5)  # the adapter is active again


def test_kl_argument_errors(model):
    batch = collate([Ex([5, 6, 7], [0, 1, 1])], 0)
    with pytest.raises(ValueError, match="ref_model"):
        weighted_loss_sum(model, batch, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_type"):
        weighted_loss_sum(model, batch, kl_coef=0.1, kl_type="reverse", ref_model=model)
    with pytest.raises(ValueError, match="peft"):
        weighted_loss_sum(model, batch, kl_coef=0.1, ref_adapter_disabled=True)
    with pytest.raises(ValueError, match="chunk_size"):
        weighted_loss_sum(model, batch, chunk_size=0)


# ------------------------------------------------------------------------------------------------ NEFTune

def captured_embeddings(model, batch):
    box = []
    h = model.get_input_embeddings().register_forward_hook(lambda m, a, out: box.append(out.detach().clone()))
    try:
        kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        model(input_ids=batch["input_ids"], use_cache=False, **kw)
    finally:
        h.remove()
    return box[0]


def test_neftune_padded(model):
    d, alpha = model.config.hidden_size, 5.0
    batch = collate([Ex(range(5, 45), [0] * 40), Ex(range(5, 15), [0] * 10)], pad_token_id=0)
    clean = model.get_input_embeddings()(batch["input_ids"]).detach()
    model.eval()
    logits_before = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    handle = neftune_hook(model, alpha)
    model.train()
    torch.manual_seed(0)
    noise = captured_embeddings(model, batch) - clean
    for row, n in enumerate((40, 10)):
        bound = alpha / (n * d) ** 0.5
        real = noise[row, :n].abs()
        assert real.max() <= bound * (1 + 1e-5)
        assert real.max() >= 0.9 * bound  # uniform: with n·d draws the max is close to the bound
        assert (noise[row, n:] == 0).all()  # padding gets no noise
    model.eval()
    assert (captured_embeddings(model, batch) == clean).all()
    model.train()
    handle.remove()
    assert (captured_embeddings(model, batch) == clean).all()
    model.eval()
    assert torch.equal(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, logits_before)


def test_neftune_packed_uses_each_example_length(model):
    d, alpha = model.config.hidden_size, 3.0
    batch = pack([Ex(range(5, 35), [0] * 30), Ex(range(5, 13), [0] * 8)], 64)
    clean = model.get_input_embeddings()(batch["input_ids"]).detach()
    with neftune_hook(model, alpha):
        noise = captured_embeddings(model, batch) - clean
    for sl, n in ((slice(0, 30), 30), (slice(30, 38), 8)):
        bound = alpha / (n * d) ** 0.5
        assert bound * 0.9 <= noise[0, sl].abs().max() <= bound * (1 + 1e-5)
    assert (captured_embeddings(model, batch) == clean).all()  # removed on leaving the with-block


def test_neftune_applies_inside_weighted_loss_sum(model):
    batch = collate([Ex(range(5, 25), [0] + [1] * 19)], 0)
    clean = weighted_loss_sum(model, batch).loss_sum.item()
    with neftune_hook(model, 50.0):
        noisy = weighted_loss_sum(model, batch).loss_sum.item()
        model.eval()
        assert weighted_loss_sum(model, batch).loss_sum.item() == clean
    assert noisy != clean


# ---------------------------------------------------------------------------------------- the evaluation side


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4), chunk=st.integers(1, 40),
       p_zero=st.sampled_from([0.0, 0.5, 0.95]), seed=st.integers(0, 2**16))
def test_score_weighted_per_row_matches_reference_and_training_loss(base, lengths, chunk, p_zero, seed):
    model = base.eval()
    gen = torch.Generator().manual_seed(seed)
    exs = random_examples(gen, model.config.vocab_size, lengths, p_zero)
    batch = collate(exs, pad_token_id=0)
    scores = score_weighted(model, batch, chunk_size=chunk)
    ce, w, n = scores.per_row(len(exs))
    for i, e in enumerate(exs):  # each example alone, unpadded, full logits
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids])).logits
        ref = reference_weighted_ce(logits, torch.tensor([e.input_ids]), torch.tensor([e.weights]))
        assert ce[i].item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
        assert w[i].item() == pytest.approx(sum(e.weights[1:]), rel=1e-6)
        assert n[i].item() == sum(x > 0 for x in e.weights[1:])
    with torch.no_grad():
        train_side = weighted_loss_sum(model, batch, chunk_size=chunk)
    assert scores.ce_sum == pytest.approx(train_side.ce_sum, abs=1e-4, rel=1e-5)
    assert scores.weight_sum == pytest.approx(train_side.weight_sum, rel=1e-6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.lists(st.integers(5, 400), min_size=1, max_size=8),
                               st.lists(st.lists(st.integers(5, 400), min_size=1, max_size=5), min_size=1,
                                        max_size=3)), min_size=1, max_size=3),
       shared=st.booleans())
def test_score_tokens_on_prefix_rows_equals_each_continuation_alone(base, rows, shared):
    """Continuations that share their context in one row score as if each followed the context alone."""
    model = base.eval()
    if not shared:  # a plain causal row is only right with at most one multi-token continuation
        rows = [(ctx, [conts[0]] + [c[:1] for c in conts[1:]]) for ctx, conts in rows]
    batch = collate_prefix_rows([(ctx, [c[:-1] for c in conts]) for ctx, conts in rows], 0, shared=shared)
    r, c, y, want, greedy = [], [], [], [], []
    for b, ((ctx, conts), starts) in enumerate(zip(rows, batch.pop("seg_starts"), strict=True)):
        for cont, s in zip(conts, starts, strict=True):
            r += [b] * len(cont)
            c += [len(ctx) - 1] + list(range(s, s + len(cont) - 1))
            y += cont
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:]
            want += logits.log_softmax(-1).gather(1, torch.tensor(cont)[:, None]).squeeze(1).tolist()
            greedy += (logits.argmax(-1) == torch.tensor(cont)).tolist()
    got = score_tokens(model, batch, *(torch.tensor(v) for v in (r, c, y)), chunk_size=3)
    torch.testing.assert_close(got.logprob, torch.tensor(want), atol=1e-4, rtol=1e-4)
    assert got.greedy.tolist() == greedy and got.rows.tolist() == r
