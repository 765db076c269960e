"""imtune.hf: the tokenised dataset, the collator, and HF Trainer / TRL SFTTrainer with imtune's loss giving the same
per-step losses, gradient norms and final weights as `imtune train` on the same batches."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import imtune
from imtune.hf import IGNORE_INDEX, WeightedCollator, encode_dataset, encode_dataset_with_report
from imtune.masking.encoding import encode
from imtune.records.loading import load_records
from imtune.training.batching import plan_batches

MBS, ACCUM, STEPS, SEED, LR, WD = 2, 2, 5, 3, 1e-2, 0.1
# fp32 on one CPU thread: both sides run the same loss engine on the same padded batches; what differs is the order
# of float additions in the optimizer/normaliser plumbing (~1e-7 relative per step, compounded over 5 Adam steps).
LOSS_RTOL, WEIGHT_ATOL = 1e-6, 1e-5


def write_data(path, n=20, seed=0):
    rows = []
    for i in range(n):
        q = " ".join(["Explain why the sky is blue."] * (1 + (i * 7 + seed) % 3))
        a = " ".join(["The answer is 4."] * (1 + (i * 5 + seed) % 4))
        msgs = [{"role": "user", "content": f"{i}: {q}"}, {"role": "assistant", "content": a}]
        if i % 4 == 0:  # some two-turn conversations: `weighted:λ` and `@last` treat earlier replies differently
            msgs += [{"role": "user", "content": "And again?"}, {"role": "assistant", "content": "Yes, 4."}]
        rows.append({"id": f"r{i}", "messages": msgs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("hfdata") / "d.jsonl")


def test_columns_match_imtunes_encoder(tiny_tok, data):
    """Same tokens and weights as `imtune train` encodes; labels are -100 exactly where the weight is 0."""
    ds, info = encode_dataset_with_report(str(data), tiny_tok, "weighted:0.3", template="chatml", max_length=96)
    ref = encode(load_records(data), tiny_tok, "weighted:0.3", template="chatml", max_length=96)
    assert ds.column_names == ["input_ids", "attention_mask", "labels", "loss_weights"]
    assert len(ds) == len(ref) == info.n_examples and info.fractional
    for row, e in zip(ds, ref, strict=True):
        assert row["input_ids"] == list(e.input_ids)
        np.testing.assert_array_equal(np.float32(row["loss_weights"]), np.float32(e.weights))
        assert row["labels"] == [t if w > 0 else IGNORE_INDEX for t, w in zip(e.input_ids, e.weights, strict=True)]
        assert row["labels"][0] == IGNORE_INDEX and set(row["attention_mask"]) == {1}
    it = encode_dataset(str(data), tiny_tok, "it", template="chatml", max_length=96)
    assert {w for r in it for w in r["loss_weights"]} == {0.0, 1.0}


def test_per_message_weights_from_the_data_reach_the_trainer(tiny_tok, tmp_path):
    """A message's `weight` multiplies the objective's weight of its tokens in `loss_weights` and `labels`."""
    rows = [{"messages": [{"role": "user", "content": "Say hi to me"},
                          {"role": "assistant", "content": "Hi there", "weight": 0.25},
                          {"role": "user", "content": "Again"},
                          {"role": "assistant", "content": "Not trained", "weight": 0}]}]
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = [{"messages": [{k: v for k, v in m.items() if k != "weight"} for m in r["messages"]]} for r in rows]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    for objective in ("it", "im"):
        weighted = encode_dataset(str(path), tiny_tok, objective, template="chatml", max_length=96)[0]
        base = encode_dataset(str(tmp_path / "plain.jsonl"), tiny_tok, objective, template="chatml",
                              max_length=96)[0]
        assert weighted["input_ids"] == base["input_ids"]
        ratios = {w / b for w, b in zip(weighted["loss_weights"], base["loss_weights"], strict=True) if b}
        assert ratios == ({0.25, 0.0} if objective == "it" else {1.0, 0.25, 0.0})
        assert all((lab == IGNORE_INDEX) == (w == 0)
                   for lab, w in zip(weighted["labels"], weighted["loss_weights"], strict=True))


def test_in_memory_dataset_and_bad_records(tiny_tok, data):
    from datasets import Dataset

    from imtune.errors import InputError

    rows = [json.loads(x) for x in data.read_text().splitlines()]
    a = encode_dataset(Dataset.from_list(rows), tiny_tok, "im", template="chatml", max_length=96)
    b = encode_dataset(str(data), tiny_tok, "im", template="chatml", max_length=96)
    assert a["input_ids"] == b["input_ids"] and a["loss_weights"] == b["loss_weights"]
    bad = rows[:3] + [{"messages": [{"role": "user", "content": "no reply"}]}]
    with pytest.raises(InputError, match=r"record 3: conversation has no assistant turn"):
        encode_dataset(bad, tiny_tok, "im", template="chatml")
    assert len(encode_dataset(bad, tiny_tok, "im", template="chatml", skip_invalid=True)) == 3
    from datasets import DatasetDict

    from imtune.errors import ImtuneError

    with pytest.raises(ImtuneError, match=r"pass one split of a DatasetDict"):
        encode_dataset(DatasetDict(train=Dataset.from_list(rows)), tiny_tok, "im", template="chatml")


def test_collator_pads_with_zero_weight_and_ignored_labels(tiny_tok, data):
    ds = encode_dataset(str(data), tiny_tok, "weighted:0.3", template="chatml", max_length=96)
    feats = [ds[0], ds[1], ds[2]]
    b = WeightedCollator(tiny_tok.pad_token_id)(feats)
    n = [len(f["input_ids"]) for f in feats]
    assert b["input_ids"].shape == (3, max(n)) and b["loss_weights"].dtype == torch.float32
    for i, k in enumerate(n):
        assert b["attention_mask"][i, :k].all() and not b["attention_mask"][i, k:].any()
        assert (b["input_ids"][i, k:] == tiny_tok.pad_token_id).all() and (b["loss_weights"][i, k:] == 0).all()
        assert b["labels"][i, :k].tolist() == feats[i]["labels"] and (b["labels"][i, k:] == IGNORE_INDEX).all()
    packed = WeightedCollator(tiny_tok.pad_token_id, padding_free=True)(feats)
    assert packed["input_ids"].shape == (1, sum(n)) and "attention_mask" not in packed
    assert packed["position_ids"][0, n[0]] == 0 and packed["loss_weights"].sum() == pytest.approx(
        b["loss_weights"].sum())
    labels_only = WeightedCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, -100]}])
    assert labels_only["loss_weights"].tolist() == [[0.0, 1.0, 0.0]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 99), st.sampled_from([0.0, 0.3, 1.0])), min_size=1, max_size=9),
                min_size=1, max_size=5), st.sampled_from([None, 4]))
def test_collator_keeps_each_example_and_pads_with_nothing(rows, multiple):
    feats = [{"input_ids": [t for t, _ in r], "loss_weights": [0.0] + [w for _, w in r[1:]]} for r in rows]
    b = WeightedCollator(7, pad_to_multiple_of=multiple)(feats)
    width = max(len(r) for r in rows)
    assert b["input_ids"].shape[1] == (width if multiple is None else -(-width // multiple) * multiple)
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        assert b["input_ids"][i, :k].tolist() == f["input_ids"] and (b["input_ids"][i, k:] == 7).all()
        assert b["loss_weights"][i, :k].tolist() == pytest.approx(f["loss_weights"])
        assert (b["loss_weights"][i, k:] == 0).all() and b["attention_mask"][i].sum() == k
    assert ((b["labels"] != IGNORE_INDEX) == (b["loss_weights"] > 0)).all()
    assert (b["labels"][b["labels"] != IGNORE_INDEX] == b["input_ids"][b["labels"] != IGNORE_INDEX]).all()


# ------------------------------------------------------------------------------- the same steps as imtune train


def imtune_run(tiny_dir, data, out, objective):
    cfg = dict(model=str(tiny_dir), data=str(data), out=str(out), template="chatml", max_length=96, lr=LR,
               warmup_ratio=0.0, micro_batch_size=MBS, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
               progress=False, seed=SEED, precision="fp32", padding_free=False, weight_decay=WD, objective=objective,
               checkpoints=False, report_to=[])
    return imtune.train(cfg)


def plan_ordered(ds):
    """The dataset in the order of imtune's length-grouped plan for epoch 0, so that a sequential sampler with the
    same micro-batch size forms the very micro-batches (and steps) `imtune train` forms."""
    mbs = plan_batches([len(x) for x in ds["input_ids"]], MBS, seed=SEED, epoch=0)
    assert all(len(mb) == MBS for mb in mbs)  # every micro-batch full, so sequential batching lines up
    return ds.select([i for mb in mbs for i in mb])


def trainer_kwargs(tmp_path):
    return dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=MBS, gradient_accumulation_steps=ACCUM,
                max_steps=STEPS, learning_rate=LR, weight_decay=WD, warmup_steps=0, lr_scheduler_type="linear",
                max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                seed=SEED, train_sampling_strategy="sequential", dataloader_num_workers=0, bf16=False,
                disable_tqdm=True)


def assert_same_run(ref, trainer, model):
    from safetensors.torch import load_file

    hf_rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(hf_rows) == len(ref.history) == STEPS
    for a, b in zip(hf_rows, ref.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["learning_rate"] == pytest.approx(b["lr"], rel=1e-9)
    final = load_file(str(ref.output_dir / "model.safetensors"))
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    for k, v in final.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.parametrize("objective", ["it", "im", "weighted:0.3"])
def test_hf_trainer_matches_imtune_train(tiny_dir, tiny_tok, data, tmp_path, objective, one_torch_thread):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from imtune.hf import WeightedTrainer

    ref = imtune_run(tiny_dir, data, tmp_path / "imtune", objective)
    ds = plan_ordered(encode_dataset(str(data), tiny_tok, objective, template="chatml", max_length=96))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    trainer = WeightedTrainer(model=model, args=TrainingArguments(**trainer_kwargs(tmp_path)), train_dataset=ds,
                              processing_class=tiny_tok)
    trainer.train()
    assert_same_run(ref, trainer, model)


@pytest.mark.parametrize("objective", ["it", "im", "weighted:0.3"])
def test_trl_sft_trainer_matches_imtune_train(tiny_dir, tiny_tok, data, tmp_path, objective, one_torch_thread):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from imtune.hf import WeightedSFTTrainer

    ref = imtune_run(tiny_dir, data, tmp_path / "imtune", objective)
    ds = plan_ordered(encode_dataset(str(data), tiny_tok, objective, template="chatml", max_length=96))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    args = SFTConfig(**trainer_kwargs(tmp_path), gradient_checkpointing=False)
    trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_tok)
    trainer.train()
    assert_same_run(ref, trainer, model)


def test_padding_free_collator_gives_the_same_steps(tiny_dir, tiny_tok, data, tmp_path, one_torch_thread):
    """One packed row per micro-batch (restarting position ids) trains exactly as the padded micro-batch."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from imtune.hf import WeightedTrainer

    ds = plan_ordered(encode_dataset(str(data), tiny_tok, "weighted:0.3", template="chatml", max_length=96))
    runs = []
    for free in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
        t = WeightedTrainer(model=model, args=TrainingArguments(**{**trainer_kwargs(tmp_path), "max_steps": 2}),
                            train_dataset=ds, data_collator=WeightedCollator(tiny_tok.pad_token_id, padding_free=free))
        t.train()
        runs.append([r["loss"] for r in t.state.log_history if "loss" in r])
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


@pytest.mark.parametrize("trl", [False, True])
def test_evaluation_reports_the_weighted_mean(tiny_dir, tiny_tok, data, tmp_path, trl, one_torch_thread):
    """eval_loss of one eval batch is its Σ w·CE / Σ w, as imtune's log-prob engine scores it."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from imtune.hf import WeightedSFTTrainer, WeightedTrainer
    from imtune.training.logprobs import score_weighted

    ds = encode_dataset(str(data), tiny_tok, "weighted:0.3", template="chatml", max_length=96)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    kw = {**trainer_kwargs(tmp_path), "per_device_eval_batch_size": len(ds)}
    if trl:
        from trl import SFTConfig

        trainer = WeightedSFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=ds, processing_class=tiny_tok)
    else:
        trainer = WeightedTrainer(model=model, args=TrainingArguments(**kw), train_dataset=ds,
                                  processing_class=tiny_tok)
    got = trainer.evaluate(ds)["eval_loss"]
    b = WeightedCollator(tiny_tok.pad_token_id)(list(ds))
    s = score_weighted(model.eval(), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                                      "weights": b["loss_weights"]})
    assert got == pytest.approx(s.ce_sum / s.weight_sum, rel=1e-5)


def test_settings_the_weighted_loss_would_ignore_are_refused(tiny_dir, tiny_tok, data, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from imtune.hf import WeightedTrainer

    ds = encode_dataset(str(data), tiny_tok, "it", template="chatml", max_length=96)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        WeightedTrainer(model=model, args=TrainingArguments(**trainer_kwargs(tmp_path), label_smoothing_factor=0.1),
                        train_dataset=ds, processing_class=tiny_tok)
    with pytest.raises(ValueError, match="compute_loss_func"):
        WeightedTrainer(model=model, args=TrainingArguments(**trainer_kwargs(tmp_path)), train_dataset=ds,
                        processing_class=tiny_tok, compute_loss_func=lambda *a, **k: 0)


# ------------------------------------------------------------------------------------------------ imtune export


def export(capsys, *args):
    from imtune.cli.main import main

    rc = main(["export", *map(str, args)])
    return rc, capsys.readouterr().err


def test_export_writes_weighted_and_labels_only_sets(tiny_dir, tiny_tok, data, tmp_path, capsys):
    from datasets import load_from_disk

    out = tmp_path / "exp"
    rc, err = export(capsys, "--data", data, "--model", tiny_dir, "--objective", "weighted:0.3", "--template",
                     "chatml", "--max-length", 96, "--out", out)
    assert rc == 0 and "fractional token weights" in err and "WeightedSFTTrainer" in err
    ref = encode_dataset(str(data), tiny_tok, "weighted:0.3", template="chatml", max_length=96)
    full = load_from_disk(str(out / "dataset"))
    assert full.column_names == ref.column_names and full["loss_weights"] == ref["loss_weights"]
    assert full["input_ids"] == ref["input_ids"] and full["labels"] == ref["labels"]
    import pyarrow.parquet as pq

    assert pq.read_table(out / "train.parquet").column("loss_weights").to_pylist() == ref["loss_weights"]
    assert pq.read_table(out / "labels_only.parquet").column_names == ["input_ids", "attention_mask", "labels"]
    assert load_from_disk(str(out / "labels_only")).column_names == ["input_ids", "attention_mask", "labels"]
    readme = (out / "README.md").read_text()
    assert "**Warning:**" in readme and f"{out.resolve()}/labels_only.parquet" in readme
    meta = json.loads((out / "imtune_export.json").read_text())
    assert meta["fractional_weights"] and meta["examples"] == len(ref)
    # 0/1 weights: the labels-only files are exact, and an earlier export is replaced only with --overwrite
    rc, err = export(capsys, "--data", data, "--model", tiny_dir, "--objective", "it", "--template", "chatml",
                     "--out", out)
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    rc, err = export(capsys, "--data", data, "--model", tiny_dir, "--objective", "it", "--template", "chatml",
                     "--out", out, "--overwrite")
    assert rc == 0 and "fractional" not in err
    assert "exact for this objective" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp or old directory left beside it


def test_export_refuses_foreign_directories_and_bad_input(tiny_dir, data, tmp_path, capsys):
    base = ["--model", tiny_dir, "--objective", "im", "--template", "chatml"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc, err = export(capsys, "--data", data, *base, "--out", foreign, "--overwrite")
    assert rc == 2 and "not written by imtune export" in err and (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "exp"
    assert export(capsys, "--data", data, *base, "--out", out)[0] == 0
    (out / "extra.txt").write_text("mine")
    rc, err = export(capsys, "--data", data, *base, "--out", out, "--overwrite")
    assert rc == 2 and "extra.txt" in err and (out / "extra.txt").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    rc, err = export(capsys, "--data", bad, *base, "--out", tmp_path / "new")
    assert rc == 2 and err.strip() == f"imtune export: error: {bad}:1: conversation has no assistant turn"
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    rc, err = export(capsys, "--data", data, *base, "--out", data)
    assert rc == 2 and "not a directory" in err


# ----------------------------------------------------------------------------------- several processes (gloo)

DDP_SCRIPT = '''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from imtune.hf import WeightedTrainer, encode_dataset
from tests.test_hf_integration import trainer_kwargs
model_dir, data, out, mbs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
ds = encode_dataset(data, tok, "weighted:0.3", template="chatml", max_length=96)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
kw = {**trainer_kwargs(__import__("pathlib").Path(out).parent), "per_device_train_batch_size": mbs}
trainer = WeightedTrainer(model=model, args=TrainingArguments(**kw), train_dataset=ds, processing_class=tok)
trainer.train()
if trainer.is_world_process_zero():
    rows = [r for r in trainer.state.log_history if "loss" in r]
    json.dump({"rows": rows, "world": trainer.args.world_size,
               "weights": {k: v.tolist() for k, v in model.state_dict().items()}}, open(out, "w"))
'''


@pytest.mark.slow
def test_two_processes_match_one(tiny_dir, data, tmp_path):
    """2 processes x micro-batch 1 x accumulation 2 take the same steps as 1 process x 2 x 2: the step's weight is
    all-reduced, so each process' share of the loss is divided by the weight of the whole step."""
    import subprocess
    import sys

    from tests import launching

    if launching.launcher() is None:
        pytest.skip("accelerate launcher not installed")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cmd = launching.command(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no"], [str(script), str(tiny_dir), str(data),
                                                         str(tmp_path / "two.json"), "1"])
    log = tmp_path / "two.log"
    assert launching.run(cmd, log) == 0, launching.tail(log)
    one = subprocess.run([sys.executable, str(script), str(tiny_dir), str(data), str(tmp_path / "one.json"), "2"],
                         env=launching.env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two, one = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("two", "one"))
    assert (two["world"], one["world"]) == (2, 1) and len(two["rows"]) == len(one["rows"]) == STEPS
    for a, b in zip(two["rows"], one["rows"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for k, v in one["weights"].items():
        np.testing.assert_allclose(two["weights"][k], v, rtol=0, atol=WEIGHT_ATOL)
