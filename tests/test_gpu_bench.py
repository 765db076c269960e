"""bench/gpu.py on the CPU: its arguments, the imtune and TRL configurations it runs, the carried-wheel logic, the
model it builds, and the RESULTS.md section it writes from what ran (the GPU run itself needs the GPU machine)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imtune.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _load_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu = _load_gpu()


def test_arguments_and_their_limits():
    a = gpu.parse_args([])
    assert (a.sizes, a.steps, a.max_length, a.micro_batch, a.objective) == ("135m", 20, 1024, 8, "im")
    assert a.runs.split(",") == ["imtune-defaults", "imtune-liger-padding-free", "trl", "fsdp"]
    assert gpu.parse_args(["--sizes", "135m,1.7b", "--runs", "trl"]).sizes == "135m,1.7b"
    for bad in (["--sizes", "7b"], ["--runs", "deepspeed"], ["--steps", "2"]):
        with pytest.raises(SystemExit) as e:
            gpu.parse_args(bad)
        assert e.value.code == 2


def test_imtune_runs_are_valid_configs_with_the_same_budget(tmp_path):
    a = gpu.parse_args(["--steps", "7", "--micro-batch", "3", "--max-length", "512"])
    cfgs = {run: TrainConfig.from_dict(gpu.imtune_config(run, "m", "d.jsonl", str(tmp_path), a)).validate()
            for run in gpu.RUNS}
    d, fused = cfgs["imtune-defaults"], cfgs["imtune-liger-padding-free"]
    assert (d.kernels, d.padding_free, d.precision) == ("auto", None, "auto")  # imtune's own defaults
    assert (fused.kernels, fused.padding_free) == ("liger", True)
    for c in cfgs.values():
        assert (c.max_steps, c.micro_batch_size, c.max_length, c.gradient_accumulation_steps) == (7, 3, 512, 1)
        assert (c.lr, c.warmup_ratio, c.lr_scheduler, c.max_grad_norm, c.seed) == (gpu.LR, 0.0, "linear", 1.0, 42)
        assert c.objective == "im" and c.template == gpu.TEMPLATE


def test_imtune_run_is_timed_between_step_ends_like_trl(tiny_dir, tmp_path):
    # Both tools' tokens/s are wall-clock from the end of step SKIP_STEPS to the end of the last step.
    from imtune.training import recipe

    a = gpu.parse_args(["--steps", "4", "--micro-batch", "2", "--max-length", "64"])
    real = recipe.Recipe.step
    r = gpu.run_imtune("imtune-no-kernels", str(tiny_dir), tmp_path, a)
    assert recipe.Recipe.step is real  # the clock is removed after the run
    assert len(r["losses"]) == 4 and r["tokens"] == sum(r["step_tokens"][gpu.SKIP_STEPS:]) > 0
    assert 0 < r["seconds"] < 60


def test_trl_runs_at_its_best_on_the_same_budget(tmp_path):
    a = gpu.parse_args(["--steps", "7", "--micro-batch", "3"])
    t = gpu.trl_args(str(tmp_path), a, use_cpu=True)  # use_cpu only because this machine has no GPU
    assert t.bf16 and not t.fp16 and t.padding_free and t.use_liger_kernel and t.completion_only_loss
    assert not t.gradient_checkpointing and t.train_sampling_strategy == "sequential" and t.max_length is None
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.max_steps) == (3, 1, 7)
    assert (t.learning_rate, t.warmup_steps, t.max_grad_norm, t.weight_decay) == (gpu.LR, 0, 1.0, 0.0)
    assert getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type) == "linear" and t.seed == 42


def test_wheel_commands_are_offline_and_dependency_free(tmp_path):
    dl = gpu.download_cmd(tmp_path)
    assert dl[1:4] == ["-m", "pip", "download"] and "--no-deps" in dl and "--only-binary=:all:" in dl
    assert dl[dl.index("--python-version") + 1] == "3.12" and dl[dl.index("-d") + 1] == str(tmp_path)
    assert {f"{k}=={v}" for k, v in gpu.PINS.items()} <= set(dl)
    (tmp_path / "b-1-py3-none-any.whl").write_text("")
    (tmp_path / "a-1-py3-none-any.whl").write_text("")
    inst = gpu.install_cmd(tmp_path, Path("/tmp/site"))
    assert {"--no-index", "--no-deps"} <= set(inst) and inst[inst.index("--target") + 1] == "/tmp/site"
    assert inst[-2:] == [str(tmp_path / "a-1-py3-none-any.whl"), str(tmp_path / "b-1-py3-none-any.whl")]


def _wheel(d: Path, dist: str, version: str, tag: str = "py3-none-any") -> None:
    (d / f"{dist.replace('-', '_')}-{version}-{tag}.whl").write_text("")


def test_check_wheels_names_what_is_missing_doubled_or_wrong(tmp_path):
    pins = {"liger-kernel": "0.8.5", "multiprocess": "0.70.19", "trl": "1.16.0"}
    assert [p.split(":")[0] for p in gpu.check_wheels(tmp_path, pins, (3, 12))] == ["liger-kernel==0.8.5",
                                                                            "multiprocess==0.70.19", "trl==1.16.0"]
    _wheel(tmp_path, "liger-kernel", "0.8.5")
    _wheel(tmp_path, "multiprocess", "0.70.19", "py312-none-any")
    _wheel(tmp_path, "trl", "1.16.0")
    assert gpu.check_wheels(tmp_path, pins, (3, 12)) == []
    # A wheel for another Python would fail the GPU machine's --no-index install: named before it is tried.
    assert gpu.check_wheels(tmp_path, pins, (3, 11)) == [
        "multiprocess-0.70.19-py312-none-any.whl: built for another Python than 3.11 (fetched for 3.12); run "
        "--fetch-wheels for this one"]
    _wheel(tmp_path, "trl", "1.15.0")
    assert gpu.check_wheels(tmp_path, pins, (3, 12)) == ["trl: 2 versions (1.15.0, 1.16.0); keep one"]
    (tmp_path / "trl-1.16.0-py3-none-any.whl").unlink()
    assert gpu.check_wheels(tmp_path, pins, (3, 12)) == ["trl: wheel is 1.15.0, pinned 1.16.0"]


def test_model_shape_carries_config_and_tokenizer_not_weights(tiny_dir, tmp_path):
    shape = gpu.write_shape(Path(tiny_dir), tmp_path / "shape")
    names = {p.name for p in shape.iterdir()}
    assert "config.json" in names and "tokenizer.json" in names and not any(n.endswith(".safetensors") for n in names)
    with pytest.raises(FileNotFoundError):
        gpu.write_shape(tmp_path / "nothing", tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_materialised_model_is_the_same_for_both_tools(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    shape = gpu.write_shape(Path(tiny_dir), tmp_path / "shape")
    a = gpu.materialise(shape, "135m", tmp_path / "a")
    b = gpu.materialise(shape, "135m", tmp_path / "b")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert AutoTokenizer.from_pretrained(str(a)).vocab_size == AutoTokenizer.from_pretrained(str(tiny_dir)).vocab_size
    cfg = AutoConfig.from_pretrained(str(tiny_dir))
    assert all(hasattr(cfg, k) for k in gpu.LARGE)  # the 1.7b overrides are real fields of the architecture


def _run(name, tok_s_tokens, losses, steps=(10, 12)):
    return {"run": name, "tokens": tok_s_tokens, "seconds": 1.0, "tok_s": float(tok_s_tokens), "losses": losses,
            "step_tokens": list(steps), "peak_gib": 1.5, "settings": "s"}


def test_section_is_written_from_what_ran_only(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from results_md import write_section

    a = gpu.parse_args(["--sizes", "135m,1.7b"])
    results = {"sizes": {"135m": [_run("imtune-defaults", 3000, [2.0, 1.0]),
                                  {"run": "imtune-liger-padding-free", "failed": "RuntimeError: boom | here"},
                                  _run("trl", 2000, [2.0, 1.25])]},
               "skipped": ["1.7b"], "fsdp": {"run": "fsdp", "failed": "timed out after 150 s"}}
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "cuda": "13.0", "transformers": "5.17", "trl": "1.16.0",
           "liger-kernel": "0.8.5", "datasets": "5.2.0", "accelerate": "1.15", "peft": "0.18"}
    text = gpu.render(results, env, a, "2026-12-03 15:00")
    assert text.startswith(gpu.SECTION + "\n") and "NVIDIA H200" in text and "liger-kernel 0.8.5" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "1.50x" in rows["imtune-defaults"] and "20.00%" in rows["imtune-defaults"]
    assert "(same batches)" in rows["imtune-defaults"]
    assert "failed: RuntimeError: boom / here" in rows["imtune-liger-padding-free"]
    assert not any(ch.isdigit() for ch in rows["imtune-liger-padding-free"].split("failed:")[0])
    assert "1.7b: skipped" in text and "FSDP smoke" in text and "failed: timed out" in text
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    write_section(gpu.SECTION, text, md)
    assert "kept" in md.read_text() and gpu.SECTION in md.read_text()


def test_without_cuda_the_driver_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--no-write"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "bench/gpu.py: no CUDA device here (it benchmarks GPU training)"


def test_gpu_sh_is_valid_bash_and_installs_with_no_index():
    sh = (ROOT / "bench" / "gpu.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")]).returncode == 0
    assert "--no-index" in sh and "--check-wheels" in sh and "HF_HUB_OFFLINE=1" in sh
    assert json.dumps(gpu.PINS)  # the pins are plain data
