"""TrainConfig: defaults, YAML, CLI overrides generated from the fields, validation messages."""

import argparse
from dataclasses import fields

import pytest

from imtune.cli.train import packaged_configs
from imtune.config import TrainConfig, add_config_arguments, config_from_args, flag
from imtune.errors import ImtuneError


def parse(argv):
    from imtune.cli.main import build_parser

    return build_parser().parse_args(["train", *argv])


def test_every_field_has_a_flag():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    opts = {o for a in p._actions for o in a.option_strings}
    for f in fields(TrainConfig):
        assert flag(f.name) in opts, f.name
    # spellings shared with the other subcommands
    for common in ("--model", "--data", "--objective", "--max-length", "--template", "--data-format",
                   "--skip-invalid", "--trust-remote-code", "--truncation-side", "--lr", "--max-steps", "--epochs",
                   "--out"):
        assert common in opts


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-5\nepochs: 3\nobjective: it\npacking: true\nlora_target_modules: [q_proj, v_proj]\n")
    args = parse([str(y), "--lr", "3e-4", "--max-steps", "7", "--no-packing", "--out", "o", "--data", "d.jsonl"])
    cfg = config_from_args(args, str(y))
    assert cfg.lr == 3e-4 and cfg.epochs == 3 and cfg.objective == "it" and cfg.max_steps == 7
    assert cfg.packing is False and cfg.lora_target_modules == "q_proj,v_proj"
    assert cfg.out == "o" and cfg.data == "d.jsonl"
    # not given on the command line -> dataclass default
    assert cfg.warmup_ratio == TrainConfig().warmup_ratio


def test_yaml_reads_1e_minus_5_as_number(tmp_path):
    # PyYAML parses 1e-5 (no dot) as a string
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-5\n")
    assert TrainConfig.from_yaml(y).lr == 1e-5


def test_unknown_key_suggests(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rat: 1e-5\n")
    with pytest.raises(ImtuneError, match="did you mean 'lr'|unknown option 'learning_rat'"):
        TrainConfig.from_yaml(y)
    with pytest.raises(ImtuneError, match="did you mean 'max_steps'"):
        TrainConfig.from_dict({"max_step": 3})


@pytest.mark.parametrize("override, msg", [
    ({"lr": -1}, "lr must be a finite number > 0"),
    ({"objective": "bogus"}, "unknown objective"),
    ({"precision": "fp8"}, "precision: 'fp8' is not one of"),
    ({"epochs": 0}, r"epochs must be an integer in \[1, "),
    ({"micro_batch_size": "two"}, "micro_batch_size must be an integer"),
    ({"warmup_ratio": 1.5}, r"warmup_ratio must be a finite number in \[0, 1\)"),
    ({"val_fraction": 0.1, "val_data": "v.jsonl"}, "either val_fraction or val_data"),
    ({"merge": True}, "merge only applies to LoRA"),
    ({"data": None}, "no training data"),
    ({"out": None}, "no output directory"),
])
def test_validation_messages(override, msg):
    d = {"data": "d.jsonl", "out": "o", **override}
    with pytest.raises(ImtuneError, match=msg):
        TrainConfig.from_dict(d).validate()


def test_accumulation_from_global_batch():
    cfg = TrainConfig(data="d", out="o", micro_batch_size=4, global_batch_size=128)
    assert cfg.accumulation_steps(1) == 32 and cfg.accumulation_steps(8) == 4
    with pytest.raises(ImtuneError, match="not a multiple"):
        cfg.accumulation_steps(3)
    with pytest.raises(ImtuneError, match="contradicts"):
        TrainConfig(data="d", out="o", micro_batch_size=4, global_batch_size=16,
                    gradient_accumulation_steps=2).accumulation_steps(1)
    assert TrainConfig(data="d", out="o", gradient_accumulation_steps=3).accumulation_steps(2) == 3


def test_roundtrip_yaml(tmp_path):
    cfg = TrainConfig(data="d.jsonl", out="o", objective="weighted:0.1", lr=1e-5, max_steps=3)
    y = tmp_path / "c.yaml"
    y.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(y) == cfg


def test_packaged_configs_load():
    cfgs = packaged_configs()
    assert {"paper_llama2_7b", "cpu_small"} <= set(cfgs)
    paper = TrainConfig.from_yaml(cfgs["paper_llama2_7b"]).replace(data="d", out="o").validate()
    assert (paper.lr, paper.lr_scheduler, paper.warmup_ratio, paper.weight_decay, paper.epochs,
            paper.global_batch_size, paper.max_length, paper.template) == (2e-5, "linear", 0.03, 0.0, 2, 128, 2048,
                                                                          "tulu")
    TrainConfig.from_yaml(cfgs["cpu_small"]).replace(data="d", out="o").validate()


def test_resume_flag_forms():
    assert parse(["--resume"]).resume == "latest"
    assert parse(["--resume", "ckpt"]).resume == "ckpt"
    assert not hasattr(parse([]), "resume")


def test_cli_bad_input_one_line_exit_2(tmp_path, capsys):
    from imtune.cli.main import main

    out = tmp_path / "o"
    rc = main(["train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out), "--model", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "imtune train: error:" in err
    assert not out.exists()
    y = tmp_path / "c.yaml"
    y.write_text("objectiv: im\n")
    rc = main(["train", str(y), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "did you mean 'objective'" in err and not out.exists()
    rc = main(["train", "--data", "x.jsonl", "--objective", "imx", "--out", str(out)])
    assert rc == 2 and "unknown objective" in capsys.readouterr().err and not out.exists()


def test_config_argument_accepts_packaged_names(tmp_path):
    from imtune.cli.train import resolve_config_path

    assert resolve_config_path("cpu_small").name == "cpu_small.yaml"
    with pytest.raises(ImtuneError, match="packaged: .*paper_llama2_7b"):
        resolve_config_path("no_such_config")
    with pytest.raises(ImtuneError, match="config file not found"):
        resolve_config_path(str(tmp_path / "x.yaml"))
