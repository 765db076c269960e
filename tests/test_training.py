"""The training recipe on the tiny model: loss normalisation invariance, outputs, LoRA, KL, NaN stop, bad inputs."""

import json
import math

import pytest
import torch

import imtune
from imtune.errors import ImtuneError
from imtune.training.recipe import CHAT_TEMPLATES, lr_lambda


def write_data(path, n=8, seed=0):
    rows = []
    for i in range(n):
        q = " ".join(["Explain why the sky is blue."] * (1 + (i * 7 + seed) % 3))
        a = " ".join(["The answer is 4."] * (1 + (i * 5 + seed) % 4))
        rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"{i}: {q}"},
                                                  {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_cfg(tiny_dir, data, out, **kw):
    # fp32: these tests compare batch layouts exactly; precision auto would pick bf16 on a bf16-native CPU, whose
    # rounding depends on the layout (tests/test_fast_defaults.py covers auto).
    cfg = dict(model=str(tiny_dir), data=str(data), out=str(out), template="chatml", max_length=96, lr=1e-2,
               warmup_ratio=0.0, micro_batch_size=2, global_batch_size=4, max_steps=2, progress=False, seed=3,
               precision="fp32")
    cfg.update(kw)
    return cfg


def weights_of(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture()
def data(tmp_path):
    return write_data(tmp_path / "d.jsonl")


def test_micro_batch_x_accumulation_invariance(tiny_dir, data, tmp_path):
    """1x4, 2x2 and 4x1 (micro-batch x accumulation) take the same optimizer steps."""
    runs = {}
    for mbs in (1, 2, 4):
        # weighted:0.3 gives unequal per-token weights, so a wrong normaliser would show
        r = imtune.train(base_cfg(tiny_dir, data, tmp_path / f"o{mbs}", micro_batch_size=mbs, group_by_length=False,
                                  objective="weighted:0.3", max_grad_norm=0.0))
        runs[mbs] = (r, weights_of(r.output_dir))
    ref_r, ref_w = runs[4]
    for mbs in (1, 2):
        r, w = runs[mbs]
        for a, b in zip(r.history, ref_r.history, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["weight_sum"] == b["weight_sum"]
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6)


def test_tokens_normalisation_divides_by_nonzero_count(tiny_dir, data, tmp_path):
    kw = dict(objective="weighted:0.25", max_steps=1)
    a = imtune.train(base_cfg(tiny_dir, data, tmp_path / "w", loss_normalization="weight", **kw)).history[0]
    b = imtune.train(base_cfg(tiny_dir, data, tmp_path / "t", loss_normalization="tokens", **kw)).history[0]
    assert a["weight_sum"] < a["weighted_tokens"]
    assert a["loss"] * a["weight_sum"] == pytest.approx(b["loss"] * b["weighted_tokens"], rel=1e-5)


def test_outputs_load_and_describe_the_run(tiny_dir, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imtune.cli.main import main
    from imtune.masking.templates import render
    from imtune.records.conversation import Conversation

    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--template", "tulu",
               "--max-length", "96", "--micro-batch-size", "2", "--epochs", "2", "--lr", "1e-3",
               "--val-fraction", "0.25", "--objective", "im", "--no-progress", "--save-total-limit", "1"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "imtune_config.yaml", "metrics.jsonl",
            "README.md", "tensorboard", "checkpoints", "final_metrics.json"} <= names
    assert not [n for n in names if n.startswith(".tmp")]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000006"]  # limit 1, 3 steps per epoch
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "weighted_tokens",
            "padding_fraction"} <= set(train_rows[0])
    assert [r["epoch"] for r in eval_rows] == [1, 2] and all(math.isfinite(r["eval_loss"]) for r in eval_rows)
    card = (out / "README.md").read_text()
    assert "Instruction Modelling" in card and "eval_loss" in card and "| lr | 0.001 |" in card
    cfg = imtune.TrainConfig.from_yaml(out / "imtune_config.yaml")
    assert cfg.val_fraction == 0.25 and cfg.template == "tulu"

    model = AutoModelForCausalLM.from_pretrained(str(out))
    sd = weights_of(out)
    for k, v in model.state_dict().items():
        if k in sd:
            torch.testing.assert_close(v, sd[k])
    tok = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == render(Conversation.from_messages(msgs), tok, "tulu").text
    assert tok.chat_template == CHAT_TEMPLATES["tulu"]
    # the same out dir again is refused without --overwrite/--resume, and nothing changes
    before = (out / "metrics.jsonl").read_text()
    rc = main(["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out)])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_saved_chat_template_matches_training_render(tiny_tok, template):
    from imtune.masking.templates import render
    from imtune.records.conversation import Conversation

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    tok = type(tiny_tok).from_pretrained(tiny_tok.name_or_path)
    tok.chat_template = CHAT_TEMPLATES[template]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.strip() == render(Conversation.from_messages(msgs), tok, template).text.strip()


def test_lora_with_kl_and_neftune_adapter_and_merge(tiny_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    common = dict(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, kl_coef=0.5, lr=5e-2)
    r = imtune.train(base_cfg(tiny_dir, data, tmp_path / "adapter", **common))
    assert (r.output_dir / "adapter_model.safetensors").exists() and (r.output_dir / "adapter_config.json").exists()
    assert not (r.output_dir / "model.safetensors").exists()
    # the reference is the adapter-disabled model: identical to the policy at step 1 (LoRA B starts at 0)
    assert r.history[0]["kl"] == pytest.approx(0.0, abs=1e-6) and r.history[1]["kl"] > 0
    adapted = AutoModelForCausalLM.from_pretrained(str(r.output_dir))  # base + adapter via transformers' peft hook
    m = imtune.train(base_cfg(tiny_dir, data, tmp_path / "merged", merge=True, **common))
    assert (m.output_dir / "model.safetensors").exists() and not (m.output_dir / "adapter_config.json").exists()
    merged0 = AutoModelForCausalLM.from_pretrained(str(m.output_dir))
    ids = torch.tensor([[5, 17, 33, 41]])
    with torch.no_grad():
        # the same run saved as adapter and as merged weights gives the same model
        torch.testing.assert_close(adapted(ids).logits, merged0(ids).logits, rtol=1e-4, atol=1e-4)


def test_full_kl_starts_at_zero_and_bf16_checkpointing_runs(tiny_dir, data, tmp_path):
    r = imtune.train(base_cfg(tiny_dir, data, tmp_path / "kl", kl_coef=1.0, kl_type="full", precision="bf16",
                              gradient_checkpointing=True))
    assert r.history[0]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert all(math.isfinite(h["loss"]) for h in r.history)


def test_packing_with_neftune(tiny_dir, data, tmp_path):
    r = imtune.train(base_cfg(tiny_dir, data, tmp_path / "p", packing=True, micro_batch_size=1,
                              global_batch_size=None, gradient_accumulation_steps=1, max_length=128,
                              neftune_alpha=5.0, kl_coef=0.1))
    assert r.history[0]["padding_fraction"] == 0.0 and math.isfinite(r.metrics["train_loss"])
    # NEFTune noise reaches the policy's embeddings in training but not the (eval-mode) reference pass
    assert r.history[0]["kl"] > 1e-6
    assert json.loads((r.output_dir / "final_metrics.json").read_text())["steps"] == 2


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny_dir, data, tmp_path, monkeypatch):
    import imtune.training.loss as loss_mod

    real = loss_mod.weighted_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, **kw):
        out = real(model, batch, **kw)
        calls["n"] += 1
        if calls["n"] > 4:  # steps 1-2 use 2 micro-batches each; step 3 goes bad
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(loss_mod, "weighted_loss_sum", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(ImtuneError, match=r"^step 3: loss is nan.*checkpoint-000002"):
        imtune.train(base_cfg(tiny_dir, data, out, max_steps=4, save_steps=2))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000002"]
    assert not (out / "model.safetensors").exists()


def test_bad_inputs_write_nothing(tiny_dir, data, tmp_path):
    out = tmp_path / "never"
    for bad in (dict(data=str(tmp_path / "missing.jsonl")), dict(objective="weighted:x"),
                dict(model=str(tmp_path / "nomodel")), dict(lora=True, lora_target_modules="no_such_module")):
        with pytest.raises(ImtuneError):
            imtune.train({**base_cfg(tiny_dir, data, out), **bad})
        assert not out.exists(), bad


def test_lr_schedules():
    from imtune.config import TrainConfig

    lin = lr_lambda(TrainConfig(warmup_ratio=0.1, lr_scheduler="linear"), 100)
    assert [lin(s) for s in (0, 5, 10, 55, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    cos = lr_lambda(TrainConfig(warmup_ratio=0.0, lr_scheduler="cosine"), 10)
    assert [cos(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


# ---- a saved model is finite (issue 8 §2) ----------------------------------------------------------------------------
def test_huge_lr_exits_2_naming_the_step_and_keeps_only_finite_checkpoints(tiny_dir, data, tmp_path, capsys):
    from safetensors.torch import load_file

    from imtune.cli.main import main

    common = ["train", "--model", str(tiny_dir), "--data", str(data), "--template", "chatml", "--max-length", "96",
              "--micro-batch-size", "2", "--no-progress", "--lr", "1e39"]
    out = tmp_path / "one"
    assert main([*common, "--out", str(out), "--max-steps", "1", "--warmup-ratio", "0", "--save-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: step 1: the update made trained weights non-finite" in err and "checkpoint: none" in err
    assert not out.exists()  # no model, no checkpoint, nothing
    # step 1 runs at lr 0 (warm-up) and is saved; step 2 overflows: the checkpoint named as good is finite
    out = tmp_path / "three"
    assert main([*common, "--out", str(out), "--max-steps", "3", "--warmup-ratio", "0.34", "--save-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: step 2: the update made trained weights non-finite" in err
    named = out / "checkpoints" / "checkpoint-000001"
    assert f"last good checkpoint: {named})" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000001"]
    assert all(torch.isfinite(t).all() for t in load_file(str(named / "weights.safetensors")).values())
    assert not (out / "model.safetensors").exists()


def test_zero_gradients_warn_in_the_log_the_summary_and_the_card(tiny_dir, data, tmp_path, capsys, monkeypatch):
    import imtune.training.loss as loss_mod

    real = loss_mod.weighted_loss_sum

    def saturated(model, batch, **kw):  # what a saturated model looks like: a loss that no weight can change
        out = real(model, batch, **kw)
        out.loss_sum = out.loss_sum * 0.0 + 7.0
        return out

    monkeypatch.setattr(loss_mod, "weighted_loss_sum", saturated)
    r = imtune.train(base_cfg(tiny_dir, data, tmp_path / "flat", max_steps=3))
    assert all(h["grad_norm"] == 0.0 for h in r.history)
    warnings = json.loads((r.output_dir / "final_metrics.json").read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("step 1: the gradients are all zero")
    assert "warning: step 1: the gradients are all zero" in capsys.readouterr().err
    assert "## Warnings" in (r.output_dir / "README.md").read_text()


def test_stall_watch_and_finiteness_check():
    from imtune.training.health import StallWatch, all_finite

    w = StallWatch(steps=3)
    assert [w.observe(s, x, 1.0) for s, x in enumerate([2.0, 1.9, 2.0, 2.0], 1)] == [None] * 4
    msg = w.observe(5, 2.0, 1.0)
    assert msg.startswith("steps 3-5: the loss has not moved") and w.observe(6, 2.0, 1.0) is None  # once
    assert all_finite([torch.full((3,), 1e15), torch.zeros(0), torch.ones(2, dtype=torch.bfloat16)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(1000)
        t[517] = bad
        assert not all_finite([torch.ones(4), t])


def test_run_summary_names_trailing_user_turns_and_examples_truncated_away(tiny_dir, tmp_path, capsys):
    rows = [json.loads(x) for x in write_data(tmp_path / "d.jsonl").read_text().splitlines()]
    rows[1]["messages"].append({"role": "user", "content": "And then?"})
    rows[2]["messages"][0]["content"] = "Explain why the sky is blue. " * 40  # the reply is cut off at 96 tokens
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = imtune.train(base_cfg(tiny_dir, tmp_path / "d.jsonl", tmp_path / "o", objective="it", max_steps=1))
    data = r.metrics["data"]
    assert data["ending_on_user_turn"] == 1 and data["dropped_by_truncation"] == 1 and data["train_examples"] == 7
    err = capsys.readouterr().err
    assert "1 example(s) (r1) end(s) on a user turn" in err
    assert "1 example(s) (r2) dropped: truncation to 96 tokens cut every weighted token" in err
    saved = json.loads((r.output_dir / "final_metrics.json").read_text())
    assert saved["data"] == data and len(saved["data_notes"]) == 3  # + "1 example(s) truncated"
    assert "- note: 1 example(s) (r1) end(s) on a user turn" in (r.output_dir / "README.md").read_text()
