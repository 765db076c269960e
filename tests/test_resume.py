"""A run SIGKILLed mid-checkpoint and resumed ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import imtune
from imtune.cli.main import main
from imtune.errors import ImtuneError

# The child dies inside save_checkpoint of step `kill_at`, after the weights/optimizer files are written to the temp
# dir but before trainer_state.json marks it complete: the worst moment for atomicity.
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    import imtune, imtune.training.checkpointing as ck

    kill_at = int(sys.argv[2])
    real = ck.write_state

    def write_state(tmp, state):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(tmp, state)

    ck.write_state = write_state
    imtune.train(json.loads(sys.argv[1]))
""")


def write_data(path, n=12):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * (1 + i % 3)},
                          {"role": "assistant", "content": "The answer is 4. " * (1 + i % 4)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cfg(tiny_dir, data, out, **kw):
    # NEFTune noise draws from torch's RNG every step, so the resumed run only matches if RNG state is restored;
    # 2 epochs make the data order of epoch 2 come from plan_batches(seed, epoch=1) after the resume.
    cfg = dict(model=str(tiny_dir), data=str(data), out=str(out), template="chatml", max_length=64, lr=5e-3,
               micro_batch_size=2, gradient_accumulation_steps=2, epochs=2, save_steps=2, save_total_limit=0,
               neftune_alpha=5.0, warmup_ratio=0.2, lr_scheduler="cosine", val_fraction=0.17, progress=False,
               seed=11)
    cfg.update(kw)
    return cfg


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def train_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_checkpoint_then_resume_matches_uninterrupted(tiny_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    ref = imtune.train(run_cfg(tiny_dir, data, tmp_path / "ref"))
    assert ref.metrics["steps"] == 6  # 10 train examples -> 3 steps of 4 per epoch

    out = tmp_path / "killed"
    cfg = run_cfg(tiny_dir, data, out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg), "6"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ckpts = sorted(x.name for x in (out / "checkpoints").iterdir())
    # saves at 2, 3 (epoch end), 4 and 6 (killed): resuming starts from step 4, in the middle of epoch 2
    assert ckpts == [".tmp-checkpoint-000006", "checkpoint-000002", "checkpoint-000003", "checkpoint-000004"]
    assert not (out / "model.safetensors").exists()
    assert max(r["step"] for r in train_rows(out)) == 6  # rows past the checkpoint exist before resuming

    res = imtune.train({**cfg, "resume": "latest"})
    assert [r["step"] for r in res.history] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(train_rows(out), train_rows(ref.output_dir), strict=True):
        for k in ("step", "epoch", "loss", "lr", "grad_norm", "eval_loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
    w, w_ref = weights(out), weights(ref.output_dir)
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=1e-5, atol=1e-6)
    assert not [x for x in (out / "checkpoints").iterdir() if x.name.startswith(".tmp")]


def test_resume_refuses_changed_settings_and_missing_checkpoint(tiny_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=8)
    out = tmp_path / "o"
    cfg = run_cfg(tiny_dir, data, out, epochs=1, val_fraction=0.0, neftune_alpha=0.0)
    r = imtune.train(cfg)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ImtuneError, match="different objective"):
        imtune.train({**cfg, "objective": "it", "resume": "latest"})
    with pytest.raises(ImtuneError, match="global batch"):
        imtune.train({**cfg, "gradient_accumulation_steps": 1, "resume": "latest"})
    with pytest.raises(ImtuneError, match="no checkpoint"):
        imtune.train({**cfg, "out": str(tmp_path / "empty"), "resume": "latest"})
    for key, value in (("data_split", "dev"), ("data_config", "x"), ("data_revision", "v1")):
        with pytest.raises(ImtuneError, match=f"different {key}"):
            imtune.train({**cfg, key: value, "resume": "latest"})
    assert (out / "metrics.jsonl").read_text() == before
    # resuming a finished run from an explicit checkpoint path redoes nothing and keeps the result
    ckpt = out / "checkpoints" / "checkpoint-000002"
    again = imtune.train({**cfg, "resume": str(ckpt)})
    assert again.metrics["steps"] == r.metrics["steps"] == 2
    assert [h["loss"] for h in again.history] == [h["loss"] for h in r.history]


def test_resume_refuses_edited_data_but_not_a_rewritten_copy_or_an_old_checkpoint(tiny_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", n=8)
    original = data.read_bytes()
    out = tmp_path / "o"
    cfg = run_cfg(tiny_dir, data, out, epochs=1, val_fraction=0.0, neftune_alpha=0.0)
    imtune.train(cfg)
    state_file = out / "checkpoints" / "checkpoint-000002" / "trainer_state.json"
    assert json.loads(state_file.read_text())["data_fingerprint"]
    before = (out / "metrics.jsonl").read_text()
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text((out / "imtune_config.yaml").read_text())
    data.write_text(data.read_text().replace("Question 3:", "Question three:"))  # same rows, one of them edited
    capsys.readouterr()
    rc = main(["train", str(yaml_cfg), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"imtune train: error: --resume: {data} changed since the checkpoint was saved"), err
    with pytest.raises(ImtuneError, match="changed since the checkpoint"):  # in-memory records: same fingerprint
        imtune.train({**cfg, "encode_cache": False, "resume": "latest"})
    assert (out / "metrics.jsonl").read_text() == before
    # The same bytes written again (new mtime) are the same data, whichever way they are read.
    data.write_bytes(original)
    assert imtune.train({**cfg, "encode_cache": False, "resume": "latest"}).metrics["steps"] == 2
    # A checkpoint saved before fingerprints were recorded resumes whatever the data.
    st = json.loads(state_file.read_text())
    del st["data_fingerprint"]
    state_file.write_text(json.dumps(st))
    data.write_text(data.read_text().replace("Question 3:", "Question three:"))
    assert imtune.train({**cfg, "resume": "latest"}).metrics["steps"] == 2
