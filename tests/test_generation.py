"""generate_texts: batching with left padding keeps results and order, stop strings, EOS/end-of-turn, seeding."""

import torch

from imtune.evaluation.generation import generate_texts, stop_token_ids, truncate_at_stop

PROMPTS = ["The quick brown fox", "Hi", "", "Write a poem about the sea. Explain why the sky is blue.", "def add(a, b):"]




def test_batched_equals_one_by_one_and_keeps_order(tiny_model, tiny_tok):
    batched = generate_texts(tiny_model, tiny_tok, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    single = [generate_texts(tiny_model, tiny_tok, [p], max_new_tokens=12, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)
    assert generate_texts(tiny_model, tiny_tok, [], progress=False) == []


def test_stop_strings_cut_the_output(tiny_model, tiny_tok):
    full = generate_texts(tiny_model, tiny_tok, PROMPTS[:1], max_new_tokens=16, progress=False)[0]
    assert len(full) > 4
    stop = full[3:5]
    cut = generate_texts(tiny_model, tiny_tok, PROMPTS[:1], max_new_tokens=16, stop=[stop], progress=False)[0]
    assert cut == full[:full.find(stop)]
    assert truncate_at_stop("abc\n\nQ: x", ["Q:", "\n\n"]) == "abc"
    assert truncate_at_stop("abc", None) == "abc"


def test_end_of_turn_token_is_a_stop_id(tiny_model, tiny_tok):
    ids = stop_token_ids(tiny_model, tiny_tok)
    assert tiny_tok.eos_token_id in ids
    assert tiny_tok.convert_tokens_to_ids("<|im_end|>") in ids  # from the chatml chat template
    assert tiny_tok.convert_tokens_to_ids("<|im_start|>") not in ids


def test_generation_stops_at_eos(tiny_model, tiny_tok, monkeypatch):
    # Force the model to emit EOS after two tokens by biasing the LM head through a forward hook.
    eos = tiny_tok.eos_token_id
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] >= 3:
            output = output.clone()
            output[..., eos] = 1e4
        return output

    h = tiny_model.lm_head.register_forward_hook(hook)
    try:
        out = generate_texts(tiny_model, tiny_tok, ["Hi"], max_new_tokens=20, progress=False)[0]
    finally:
        h.remove()
    assert len(tiny_tok(out, add_special_tokens=False)["input_ids"]) <= 3


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_model, tiny_tok):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.95, progress=False, batch_size=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate_texts(tiny_model, tiny_tok, PROMPTS, seed=7, **kw)
    after = torch.rand(1)
    b = generate_texts(tiny_model, tiny_tok, PROMPTS, seed=7, **kw)
    c = generate_texts(tiny_model, tiny_tok, PROMPTS, seed=8, **kw)
    assert a == b
    assert a != c
    assert torch.equal(before, after)


def test_training_mode_is_restored(tiny_model, tiny_tok):
    tiny_model.train()
    try:
        generate_texts(tiny_model, tiny_tok, ["Hi"], max_new_tokens=2, progress=False)
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_stop_string_ends_generation_early_and_one_from_the_prompt_does_not(tiny_model, tiny_tok):
    """transformers' stop_strings stop a row as soon as it completes one (so fewer forward passes); a match that
    begins in the prompt ("fox" + " ..." for the stop "x ") does not end the completion."""
    full = generate_texts(tiny_model, tiny_tok, PROMPTS[:1], max_new_tokens=16, progress=False)[0]
    calls = {"n": 0}
    h = tiny_model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        early = full[1:3]  # completes within the first tokens
        cut = generate_texts(tiny_model, tiny_tok, PROMPTS[:1], max_new_tokens=16, stop=[early], progress=False)[0]
    finally:
        h.remove()
    assert cut == full[:full.find(early)] and calls["n"] < 8
    straddle = "x "  # the prompt ends in "fox", the completion starts with " "
    assert full.startswith(" ") and "x " in full[1:]
    got = generate_texts(tiny_model, tiny_tok, PROMPTS[:1], max_new_tokens=16, stop=[straddle], progress=False)
    assert got[0] == truncate_at_stop(full, [straddle])
