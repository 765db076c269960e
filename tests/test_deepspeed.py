"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on 2 CPU processes (gloo), launched as on GPUs:
`accelerate launch --config_file deepspeed_zero{2,3}.yaml --num_processes 2`.

- the same losses (rel 1e-5), gradient norms (rel 1e-4) and final weights (max abs 5e-5: fp32, gradients reduced in
  another order) as one process with the same global batch, with KL, and with LoRA (merged); clipping is on;
- the final model is saved whole (ZeRO-3 gathers its shards) as safetensors that plain `from_pretrained` loads;
- `kill -9` of the launcher mid-run stops the workers, and `--resume` ends with the weights of an uninterrupted run;
- a DeepSpeed checkpoint is refused with one line by a launch without DeepSpeed.

Each stage's 2-process runs share one launch (a driver calling `imtune.train` per config), as in test_fsdp.py.
"""

import json

import pytest

import imtune
from imtune.errors import ImtuneError
from tests import launching
from tests.test_fsdp import BASE, DRIVER, max_abs_diff, rows, weights, write_data

pytest.importorskip("deepspeed")

STAGES = (2, 3)
CASES = {
    "im-kl": dict(objective="im", kl_coef=0.5),
    "lora-merge": dict(objective="weighted:0.3", lora=True, merge=True, lora_dropout=0.0, lr=5e-2, val_fraction=0.2),
}
# The run test_kill9_then_resume interrupts: 20 steps, a checkpoint every 2. LoRA: the checkpoint holds the trainable
# weights only (the base comes from --model again). NEFTune noise comes from each process' torch RNG, so the resumed
# run only matches if accelerate restored every process' RNG state.
RESUME = dict(BASE, objective="im", global_batch_size=2, epochs=4, save_steps=2, neftune_alpha=5.0, lora=True,
              lora_dropout=0.0, lr=5e-2)


def config_file(stage: int):
    return launching.ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml"


def launch_args(stage: int) -> list[str]:
    return ["--config_file", str(config_file(stage)), "--num_processes", "2"]


@pytest.fixture(scope="module")
def ds_runs(tiny_dir, tmp_path_factory):
    """{stage: {name: output dir}}: every CASES config plus RESUME, one 2-process launch per ZeRO stage."""
    if launching.launcher() is None:
        pytest.skip("accelerate launcher not installed")
    d = tmp_path_factory.mktemp("deepspeed")
    data = write_data(d / "d.jsonl")
    (d / "driver.py").write_text(DRIVER)
    runs = {"data": data}
    for stage in STAGES:
        outs = {name: d / f"z{stage}-{name}" for name in [*CASES, "resume"]}
        cfgs = [dict(BASE, **CASES[n], model=str(tiny_dir), data=str(data), out=str(outs[n])) for n in CASES]
        cfgs.append(dict(RESUME, model=str(tiny_dir), data=str(data), out=str(outs["resume"])))
        (d / f"cfgs{stage}.json").write_text(json.dumps(cfgs))
        log = d / f"launch{stage}.log"
        rc = launching.run(launching.command(launch_args(stage), [str(d / "driver.py"), str(d / f"cfgs{stage}.json")]),
                           log)
        assert rc == 0, launching.tail(log)
        runs[stage] = outs
    return runs


@pytest.fixture(scope="module")
def one_process(ds_runs, tiny_dir, tmp_path_factory):
    """The one-process run of a CASES config, trained once for both stages."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(f"one-{name}")
            done[name] = imtune.train(dict(BASE, **CASES[name], model=str(tiny_dir), data=str(ds_runs["data"]),
                                           out=str(out / "o")))
        return done[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_two_processes_match_one(stage, name, ds_runs, one_process):
    from transformers import AutoModelForCausalLM

    two = ds_runs[stage][name]
    one = one_process(name)
    r1 = [json.loads(x) for x in (one.output_dir / "metrics.jsonl").read_text().splitlines()]
    r2 = rows(two)
    assert [r["step"] for r in r2 if "loss" in r] == list(range(1, one.metrics["steps"] + 1))
    for a, b in zip(r2, r1, strict=True):
        for k in ("loss", "ce_loss", "kl", "eval_loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
        if "grad_norm" in b:
            assert b["grad_norm"] > BASE["max_grad_norm"] or name == "lora-merge"  # clipping does something
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["weighted_tokens"] == b["weighted_tokens"]
    diff = max_abs_diff(weights(two), weights(one.output_dir))
    print(f"\nDeepSpeed ZeRO-{stage} 2 processes vs 1 process, {name}: max abs weight difference {diff:.3g}")
    assert diff < 5e-5
    ckpt = two / "checkpoints" / f"checkpoint-{one.metrics['steps']:06d}"
    assert (ckpt / "deepspeed" / "pytorch_model").is_dir() and not (ckpt / "weights.safetensors").exists()
    assert {p.name for p in (ckpt / "deepspeed").glob("random_states_*")} == {"random_states_0.pkl",
                                                                            "random_states_1.pkl"}
    m = AutoModelForCausalLM.from_pretrained(str(two))
    assert {str(p.dtype) for p in m.parameters()} == {"torch.float32"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 checkpoints go through the same save_state / load_state
def test_kill9_then_resume(stage, ds_runs, tiny_dir, tmp_path):
    """The real CLI under the DeepSpeed config; SIGKILL to the launcher only, as a scheduler or OOM killer would."""
    out = tmp_path / "killed"
    cfg = dict(RESUME, model=str(tiny_dir), data=str(ds_runs["data"]), out=str(out))
    train = ["-m", "imtune.cli.main", "train", *launching.cli_args(cfg)]
    launching.kill_launcher_after_first_checkpoint(launching.command(launch_args(stage), train), out,
                                                   tmp_path / "killed.log")

    log2 = tmp_path / "resumed.log"
    assert launching.run(launching.command(launch_args(stage), [*train, "--resume"]), log2) == 0, launching.tail(log2)
    assert "resuming from" in log2.read_text()
    ref = ds_runs[stage]["resume"]
    for a, b in zip(rows(out), rows(ref), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    diff = max_abs_diff(weights(out), weights(ref))
    print(f"\nDeepSpeed ZeRO-{stage} kill -9 + --resume vs uninterrupted: max abs weight difference {diff:.3g}")
    assert diff < 1e-6
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    import torch

    saved = out / "checkpoints" / "checkpoint-000020" / "deepspeed" / "pytorch_model"
    for f in saved.glob("*model_states.pt"):  # the frozen base model is not in the checkpoint
        module = torch.load(f, map_location="cpu", weights_only=False)["module"] or {}
        # lm_head.weight: the tiny model ties it to the embeddings, and DeepSpeed leaves out frozen parameters by their
        # named_parameters() name, which a tied weight has only once.
        assert all("lora_" in k or k.endswith("lm_head.weight") for k in module), sorted(module)[:3]


@pytest.mark.slow
def test_deepspeed_checkpoint_refused_without_deepspeed(ds_runs, tiny_dir, tmp_path):
    ckpt = ds_runs[2]["resume"] / "checkpoints" / "checkpoint-000002"
    cfg = dict(RESUME, model=str(tiny_dir), data=str(ds_runs["data"]), out=str(tmp_path / "o"), resume=str(ckpt))
    with pytest.raises(ImtuneError, match="saved under a DeepSpeed launch; resume it with the launch it was saved"):
        imtune.train(cfg)


def test_deepspeed_configs():
    """The packaged configs: ZeRO-2 and ZeRO-3, imtune's own accumulation, fp32 master weights, model loaded whole."""
    import yaml

    for stage in STAGES:
        c = yaml.safe_load(config_file(stage).read_text())
        assert c["distributed_type"] == "DEEPSPEED" and c["deepspeed_config"]["zero_stage"] == stage
        assert c["deepspeed_config"]["gradient_accumulation_steps"] == 1 and c["mixed_precision"] == "no"
        assert c["use_cpu"] is False  # accelerate launches DeepSpeed only so, on CPU-only machines too
    z3 = yaml.safe_load(config_file(3).read_text())["deepspeed_config"]
    assert z3["zero3_init_flag"] is False and z3["zero3_save_16bit_model"] is True


def test_checkpoint_of_another_launch_is_one_line(tmp_path):
    """Each checkpoint layout names the launch that wrote it; resuming it under another stops with one line."""
    from imtune.training import checkpointing

    marks = {"plain": "weights.safetensors", "fsdp": "sharded", "deepspeed": "deepspeed"}
    launches = {"plain": "a launch without FSDP or DeepSpeed", "fsdp": "an FSDP launch",
                "deepspeed": "a DeepSpeed launch"}
    for saved, mark in marks.items():
        d = tmp_path / saved
        d.mkdir()
        (d / mark).write_bytes(b"") if saved == "plain" else (d / mark).mkdir()
        for layout in marks:
            if layout == saved:
                checkpointing._check_layout(d, layout)
                continue
            with pytest.raises(ImtuneError) as e:
                checkpointing._check_layout(d, layout)
            assert str(e.value) == f"{d}: saved under {launches[saved]}; resume it with the launch it was saved with"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImtuneError, match="holds no weights"):
        checkpointing._check_layout(tmp_path / "empty", "deepspeed")
