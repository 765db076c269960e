"""Fast defaults: precision auto resolves per device, padding-free keeps the loss, the run summary names the choices."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import imtune
from imtune.config import TrainConfig
from imtune.training import fast_defaults
from imtune.training.batching import collate, pack
from imtune.training.loss import weighted_loss_sum
from tests.test_training import base_cfg, write_data


@pytest.fixture()
def data(tmp_path):
    return write_data(tmp_path / "d.jsonl")


class Ex:
    def __init__(self, ids, w):
        self.input_ids, self.weights, self.id = ids, w, "x"

    def __len__(self):
        return len(self.input_ids)


def test_precision_default_is_auto_and_validates():
    assert TrainConfig().precision == "auto"
    TrainConfig(data="d.jsonl", out="o", precision="auto").validate()


@pytest.mark.parametrize("feature, want", [("avx512_bf16", "bf16"), ("amx_bf16", "bf16"), (None, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, feature, want):
    monkeypatch.setattr(fast_defaults, "cpu_bf16_feature", lambda: feature)
    precision, why = fast_defaults.resolve_precision("auto", "cpu")
    assert precision == want
    assert why == (f"auto: CPU has native bf16 ({feature})" if feature else "auto: CPU lacks native bf16")
    # An explicit choice is never overridden.
    assert fast_defaults.resolve_precision("fp32", "cpu") == ("fp32", None)
    assert fast_defaults.resolve_precision("bf16", "cpu") == ("bf16", None)


@pytest.mark.parametrize("supported", [True, False])
def test_auto_precision_on_cuda_follows_bf16_support(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert fast_defaults.resolve_precision("auto", "cuda")[0] == ("bf16" if supported else "fp32")


def test_cpuinfo_flags_parse_x86_and_arm():
    x86 = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert fast_defaults.bf16_flag_in_cpuinfo(x86) == "avx512_bf16"
    assert fast_defaults.bf16_flag_in_cpuinfo(arm) == "bf16"
    assert fast_defaults.bf16_flag_in_cpuinfo("flags\t: fpu avx2 avx512f\n") is None


def test_this_cpu_detection_agrees_with_proc_cpuinfo():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert (fast_defaults.cpu_bf16_feature() is None) == (fast_defaults.bf16_flag_in_cpuinfo(text) is None)


def test_packed_loss_equals_unpacked_loss(tiny_dir, one_torch_thread):
    """The padding-free layout (one row, restarting position_ids) gives the padded batch's loss and gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).train()
    gen = torch.Generator().manual_seed(1)
    exs = [Ex(torch.randint(5, model.config.vocab_size, (n,), generator=gen).tolist(),
              torch.rand(n, generator=gen).tolist()) for n in (9, 3, 14, 6)]
    out = {}
    for name, batch in (("padded", collate(exs, pad_token_id=0)), ("packed", pack(exs, 64))):
        batch.pop("seq_lens", None)
        model.zero_grad(set_to_none=True)
        o = weighted_loss_sum(model, batch)
        o.loss_sum.backward()
        out[name] = (float(o.loss_sum.detach()), o.weight_sum, [p.grad.clone() for p in model.parameters()])
    (lp, wp, gp), (lk, wk, gk) = out["padded"], out["packed"]
    assert wp == pytest.approx(wk, rel=1e-6)
    assert lk == pytest.approx(lp, rel=1e-5)
    for a, b in zip(gp, gk, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def _summary_line(err: str) -> str:
    return [line for line in err.splitlines() if "training examples" in line][-1]


def test_summary_names_the_choices_and_config_records_them(tiny_dir, data, tmp_path, capsys):
    r = imtune.train(base_cfg(tiny_dir, data, tmp_path / "auto", precision="auto"))  # padding_free: auto too
    want = "bf16" if fast_defaults.cpu_bf16_feature() else "fp32"
    line = _summary_line(capsys.readouterr().err)
    assert f"precision {want}" in line and "precision auto: CPU" in line
    assert "length grouping on" in line and "padding-free off" in line and "padding-free auto: off with sdpa" in line
    saved = yaml.safe_load((tmp_path / "auto" / "imtune_config.yaml").read_text())
    assert saved["precision"] == want and saved["padding_free"] is False and r.config.precision == want


def test_padding_free_training_matches_padded_training(tiny_dir, data, tmp_path, capsys):
    """Same examples in every step, so the same losses and weights (fp32), just no padding."""
    runs = {}
    for pf in (False, True):
        runs[pf] = imtune.train(base_cfg(tiny_dir, data, tmp_path / f"pf{pf}", precision="fp32", padding_free=pf))
    line = _summary_line(capsys.readouterr().err)
    assert "padding-free on" in line and "precision fp32" in line and "padding 0.0%" in line
    a, b = runs[False].history, runs[True].history
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert all(r["padding_fraction"] == 0.0 for r in b)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / f"pf{pf}" / "model.safetensors")) for pf in (False, True))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "pfTrue" / "final_metrics.json").read_text())["steps"] == 2
