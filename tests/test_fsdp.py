"""FSDP2 on 2 CPU processes (gloo), launched exactly as on GPUs: `accelerate launch --config_file fsdp_cpu.yaml`.

- the same losses and final weights as one process with the same global batch (fp32 tolerance), for `it`, `im`
  and `weighted:0.3` with KL on and off, and with LoRA (adapter, and merged);
- sharded (DCP) checkpoints; `kill -9` of the launcher mid-run stops the workers too, and `--resume` ends with
  the same weights as an uninterrupted run; every output loads with plain `from_pretrained`.

The 2-process runs of the equivalence matrix share one launch (a driver calling `imtune.train` per config), so
the suite pays the start-up of a distributed job once. Max abs weight differences are printed (`pytest -s`).
"""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import imtune
from tests import launching

FSDP_CPU = launching.ACCELERATE_CONFIGS / "fsdp_cpu.yaml"

DRIVER = textwrap.dedent("""
    import json, sys
    import imtune

    for cfg in json.loads(open(sys.argv[1]).read()):
        imtune.train(cfg)
""")

# 9 examples, micro-batch 1, global batch 4: steps of 4, 4 and 1 micro-batches, so in the last step one process
# has none and runs the zero-weight stand-in pass. Clipping is on (max_grad_norm 1) so FSDP's clip is exercised.
BASE = dict(template="chatml", max_length=64, micro_batch_size=1, global_batch_size=4, epochs=1, lr=5e-3,
            warmup_ratio=0.0, seed=5, progress=False, max_grad_norm=1.0, save_total_limit=0, precision="fp32")
CASES = {
    **{f"{obj}-kl{kl:g}": dict(objective=obj, kl_coef=kl) for obj in ("it", "im", "weighted:0.3") for kl in (0, .5)},
    # lora_dropout 0: dropout masks come from each process' own RNG stream, so they cannot match one process.
    "lora-kl": dict(objective="it", kl_coef=0.5, lora=True, lora_dropout=0.0, lr=5e-2),
    "lora-merge": dict(objective="weighted:0.3", lora=True, merge=True, lora_dropout=0.0, lr=5e-2, val_fraction=0.2),
}
# The runs that test_kill9_launcher_mid_run_then_resume interrupts: 20 steps, a checkpoint every 2. NEFTune noise
# comes from each process' torch RNG, so the full run only matches if every process' RNG state is restored.
RESUME = {"full": dict(BASE, objective="im", global_batch_size=2, epochs=4, save_steps=2, neftune_alpha=5.0),
          "lora": dict(BASE, objective="im", global_batch_size=2, epochs=4, save_steps=2, lora=True,
                       lora_dropout=0.0, lr=5e-2)}


def write_data(path, n=9):
    rows = [{"messages": [{"role": "user", "content": f"Item {i}: " + "summarise the following text. " * (1 + i % 3)},
                          {"role": "assistant", "content": "The quick brown fox. " * (1 + i % 4)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = out / "adapter_model.safetensors"
    return load_file(str(f if f.exists() else out / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_dir, tmp_path_factory):
    """Every CASES config plus RESUME, trained by one 2-process FSDP launch; {name: output dir}."""
    if launching.launcher() is None:
        pytest.skip("accelerate launcher not installed")
    d = tmp_path_factory.mktemp("fsdp")
    data = write_data(d / "d.jsonl")
    # The base model carries a generation config of its own, which the gathered FSDP output must keep.
    base = d / "base"
    shutil.copytree(tiny_dir, base)
    (base / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [0, 2], "pad_token_id": 3, "do_sample": True, "temperature": 0.7}))
    outs = {name: d / name for name in [*CASES, *(f"resume-{k}" for k in RESUME)]}
    cfgs = [dict(BASE, **CASES[n], model=str(base), data=str(data), out=str(outs[n])) for n in CASES]
    cfgs += [dict(RESUME[k], model=str(base), data=str(data), out=str(outs[f"resume-{k}"])) for k in RESUME]
    (d / "cfgs.json").write_text(json.dumps(cfgs))
    (d / "driver.py").write_text(DRIVER)
    log = d / "launch.log"
    rc = launching.run(launching.command(["--config_file", str(FSDP_CPU)], [str(d / "driver.py"), str(d / "cfgs.json")]),
                       log)
    assert rc == 0, launching.tail(log)
    return {"data": data, "model": base, **outs}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_two_processes_match_one(name, fsdp_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    two = fsdp_runs[name]
    one = imtune.train(dict(BASE, **CASES[name], model=str(fsdp_runs["model"]), data=str(fsdp_runs["data"]),
                            out=str(tmp_path / "one")))
    r2 = rows(two)
    r1 = [json.loads(x) for x in (one.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = one.metrics["steps"]  # 3; 2 for lora-merge, whose 7 training examples give steps of 4 and 3
    assert [r["step"] for r in r2 if "loss" in r] == list(range(1, steps + 1))
    for a, b in zip(r2, r1, strict=True):
        for k in ("loss", "ce_loss", "kl", "eval_loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
        if "grad_norm" in b:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["weighted_tokens"] == b["weighted_tokens"]
    diff = max_abs_diff(weights(two), weights(one.output_dir))
    print(f"\nFSDP 2 processes vs 1 process, {name}: max abs weight difference {diff:.3g}")
    assert diff < 5e-5
    # The checkpoint is sharded: one DCP file per process, no gathered weights file.
    ckpt = two / "checkpoints" / f"checkpoint-{steps:06d}"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "weights.safetensors").exists()
    # One full Hugging Face model (or adapter) directory that plain transformers loads.
    m = AutoModelForCausalLM.from_pretrained(str(two))
    if (two / "config.json").exists():
        assert json.loads((two / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        gen = json.loads((two / "generation_config.json").read_text())
        assert (gen["eos_token_id"], gen["temperature"]) == ([0, 2], 0.7)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(m(input_ids=ids).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RESUME))
def test_kill9_launcher_mid_run_then_resume(kind, fsdp_runs, tmp_path):
    """The real CLI under the FSDP config; SIGKILL to the launcher only, as a scheduler or OOM killer would."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "killed"
    cfg = dict(RESUME[kind], model=str(fsdp_runs["model"]), data=str(fsdp_runs["data"]), out=str(out))
    cmd = launching.command(["--config_file", str(FSDP_CPU)], ["-m", "imtune.cli.main", "train",
                                                               *launching.cli_args(cfg)])
    launching.kill_launcher_after_first_checkpoint(cmd, out, tmp_path / "killed.log", n_workers=2)

    log2 = tmp_path / "resumed.log"
    resume = launching.command(["--config_file", str(FSDP_CPU)], ["-m", "imtune.cli.main", "train",
                                                                  *launching.cli_args(cfg), "--resume"])
    assert launching.run(resume, log2) == 0, launching.tail(log2)
    assert "resuming from" in log2.read_text()
    ref = fsdp_runs[f"resume-{kind}"]
    for a, b in zip(rows(out), rows(ref), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    diff = max_abs_diff(weights(out), weights(ref))
    print(f"\nFSDP kill -9 + --resume vs uninterrupted FSDP run ({kind}): max abs weight difference {diff:.3g}")
    assert diff < 1e-6
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    AutoModelForCausalLM.from_pretrained(str(out))


@pytest.mark.slow
def test_fsdp_two_machines(fsdp_runs, tmp_path):
    """The 2-machine form of the launch (--num_machines 2, --machine_rank, --main_process_ip), one process per
    "machine" on loopback, gives the run that one 2-process launch gives."""
    cfg = dict(BASE, **CASES["weighted:0.3-kl0"], model=str(fsdp_runs["model"]), data=str(fsdp_runs["data"]),
               out=str(tmp_path / "o"))
    port = str(launching.free_port())
    procs = []
    try:
        for rank in (0, 1):
            cmd = [launching.launcher(), "launch", "--config_file", str(FSDP_CPU), "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", port, "-m", "imtune.cli.main", "train", *launching.cli_args(cfg)]
            procs.append(launching.start(cmd, tmp_path / f"node{rank}.log"))
        for rank, p in enumerate(procs):
            assert p.wait(timeout=400) == 0, launching.tail(tmp_path / f"node{rank}.log")
    finally:
        for p in procs:
            launching.reap(p)
    assert "2 process(es)" in (tmp_path / "node0.log").read_text()
    diff = max_abs_diff(weights(tmp_path / "o"), weights(fsdp_runs["weighted:0.3-kl0"]))
    print(f"\nFSDP 2 machines x 1 process vs 1 machine x 2 processes: max abs weight difference {diff:.3g}")
    assert diff < 1e-6
    assert [r["loss"] for r in rows(tmp_path / "o")] == pytest.approx(
        [r["loss"] for r in rows(fsdp_runs["weighted:0.3-kl0"])], rel=1e-6)


def test_fsdp_configs_agree():
    """fsdp.yaml (GPUs) shards exactly as the tested fsdp_cpu.yaml (DeepSpeed: tests/test_deepspeed.py)."""
    import yaml

    gpu = yaml.safe_load((launching.ACCELERATE_CONFIGS / "fsdp.yaml").read_text())
    cpu = yaml.safe_load(FSDP_CPU.read_text())
    assert gpu["fsdp_config"] == cpu["fsdp_config"] and gpu["fsdp_config"]["fsdp_version"] == 2
    assert gpu["mixed_precision"] == cpu["mixed_precision"] == "no"
    assert (gpu["use_cpu"], cpu["use_cpu"]) == (False, True)
