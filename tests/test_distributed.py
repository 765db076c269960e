"""`accelerate launch` with 2 CPU processes (gloo) follows the same loss trajectory as one process."""
# On a machine with GPUs the same launch would use them; this test is about the CPU path. FSDP: tests/test_fsdp.py.

import json

import pytest

import imtune
from tests import launching


def write_data(path, n=9):
    rows = [{"messages": [{"role": "user", "content": f"Item {i}: " + "summarise the following text. " * (1 + i % 3)},
                          {"role": "assistant", "content": "The quick brown fox. " * (1 + i % 4)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tiny_dir, tmp_path):
    if launching.launcher() is None:
        pytest.skip("accelerate launcher not installed")
    data = write_data(tmp_path / "d.jsonl")
    # 9 examples, micro-batch 1, global batch 4: steps of 4, 4 and 1 micro-batches. The last step leaves the
    # second process without a micro-batch, which exercises its zero-weight stand-in pass. objective weighted:0.5
    # makes token weights unequal, so a per-process normaliser would show.
    cfg = {"model": str(tiny_dir), "data": str(data), "template": "chatml", "max_length": 64, "micro_batch_size": 1,
           "global_batch_size": 4, "epochs": 1, "lr": 5e-3, "warmup_ratio": 0, "objective": "weighted:0.5",
           "seed": 5, "progress": False, "max_grad_norm": 0.0, "precision": "fp32"}
    # accelerate 1.x runs `--cpu` jobs through its single-process launcher (several processes only via MPI);
    # --multi_gpu goes through torchrun, and imtune's Accelerator(cpu=True) on a GPU-less machine makes it gloo.
    cmd = launching.command(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no"],
                            ["-m", "imtune.cli.main", "train", *launching.cli_args(cfg), "--out", str(tmp_path / "two")])
    log = tmp_path / "two.log"
    assert launching.run(cmd, log) == 0, launching.tail(log)
    assert "2 process(es)" in log.read_text()

    one = imtune.train({**cfg, "out": str(tmp_path / "one")})
    two = rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert [r["weighted_tokens"] for r in two] == [r["weighted_tokens"] for r in one.history]
    for a, b in zip(two, one.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert (tmp_path / "two" / "model.safetensors").exists()
