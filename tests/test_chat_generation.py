import json

import pytest

from imtune.cli.main import main
from imtune.errors import ImtuneError
from imtune.evaluation import chat_generation
from imtune.evaluation.chat_generation import generate_chat, split_last_turn, stop_strings
from imtune.masking.templates import render_prompt
from imtune.records.conversation import Conversation

PROMPTS = [
    [{"role": "user", "content": "Write a poem about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "user", "content": "Translate to French: hello"}],
]


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()


def test_greedy_is_deterministic_and_batch_independent(tiny_model, tiny_tok):
    a = generate_chat(tiny_model, tiny_tok, PROMPTS, template="tulu", max_new_tokens=6, batch_size=3, progress=False)
    b = generate_chat(tiny_model, tiny_tok, PROMPTS, template="tulu", max_new_tokens=6, batch_size=1, progress=False)
    assert a == b
    assert len(a) == len(PROMPTS) and all(isinstance(x, str) for x in a)
    assert all(x == x.strip() for x in a)


def test_sampling_respects_max_new_tokens_and_seed(tiny_model, tiny_tok, monkeypatch):
    new_tokens = []
    real = tiny_model.generate

    def counting(input_ids, **kw):
        seqs = real(input_ids=input_ids, **kw)
        new_tokens.append(seqs.shape[1] - input_ids.shape[1])
        return seqs

    # Counted on the generated ids: re-tokenising decoded text of random byte tokens is not length-preserving.
    monkeypatch.setattr(tiny_model, "generate", counting)
    kw = dict(template="chatml", do_sample=True, temperature=1.5, top_p=1.0, seed=3, progress=False)
    a = generate_chat(tiny_model, tiny_tok, PROMPTS, max_new_tokens=5, **kw)
    assert a == generate_chat(tiny_model, tiny_tok, PROMPTS, max_new_tokens=5, **kw)
    assert any(a)  # a random model sampled hot says *something*
    assert new_tokens and max(new_tokens) <= 5


def test_prompts_and_stops_passed_to_generate_texts(tiny_model, tiny_tok, monkeypatch):
    seen = {}

    def fake(model, tokenizer, prompts, **kw):
        seen.update(prompts=prompts, **kw)
        return ["  Hello there.\n<|user|>\nmore", "Bye</s>", "\n"]

    monkeypatch.setattr("imtune.evaluation.generation.generate_texts", fake)
    out = generate_chat(tiny_model, tiny_tok, PROMPTS, template="tulu", max_new_tokens=7, progress=False)
    assert out == ["Hello there.", "Bye</s>", ""]
    assert seen["prompts"] == [render_prompt(p, tiny_tok, "tulu") for p in PROMPTS]
    assert seen["prompts"][0].endswith("<|assistant|>\n")
    assert seen["max_new_tokens"] == 7 and seen["add_special_tokens"] is False and seen["do_sample"] is False
    assert {"<|user|>", tiny_tok.eos_token} <= set(seen["stop"])
    # the tokenizer's own template: rendered with add_generation_prompt
    generate_chat(tiny_model, tiny_tok, PROMPTS[:1], template="tokenizer", progress=False)
    assert seen["prompts"][0].endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in seen["stop"]


def test_stop_strings(tiny_tok):
    assert stop_strings("chatml", tiny_tok)[0] == "<|im_end|>"
    assert "\n<|user|>" in stop_strings("tulu", tiny_tok)
    assert "### Instruction:" in stop_strings("alpaca", tiny_tok)
    with pytest.raises(ImtuneError):
        stop_strings("nope", tiny_tok)


def test_split_last_turn():
    conv = Conversation.from_messages(PROMPTS[1] + [{"role": "assistant", "content": "6"}])
    prompt, ref = split_last_turn(conv)
    assert prompt == PROMPTS[1] and ref == "6"
    with pytest.raises(ImtuneError):
        split_last_turn([{"role": "assistant", "content": "hi"}])


def test_cli_generate_end_to_end(tmp_path, tiny_dir, tiny_model, tiny_tok):
    data = tmp_path / "d.jsonl"
    recs = [{"id": f"r{i}", "messages": p + [{"role": "assistant", "content": f"ref {i}"}]}
            for i, p in enumerate(PROMPTS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "gen.jsonl"
    rc = main(["generate", "--model", str(tiny_dir), "--data", str(data), "--n", "2", "--max-new-tokens", "4",
               "--out", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1"]
    assert [r["prompt"] for r in rows] == PROMPTS[:2]
    assert [r["reference"] for r in rows] == ["ref 0", "ref 1"]
    expected = generate_chat(tiny_model, tiny_tok, PROMPTS[:2], template="tulu", max_new_tokens=4, progress=False)
    assert [r["output"] for r in rows] == expected


def test_cli_generate_bad_input(tmp_path, tiny_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [}\n')
    rc = main(["generate", "--model", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "g.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{bad}:2:" in err[0]
    assert not (tmp_path / "g.jsonl").exists()


def test_module_exports():
    assert chat_generation.generate_chat is generate_chat
