"""Models by Hugging Face Hub id, through the standard hub cache, with no network (run as the user would: a fresh
process whose HF_HOME / HF_HUB_OFFLINE / HF_TOKEN / HF_ENDPOINT are set before huggingface_hub is imported)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import pickle_only_copy, put_in_hub_cache, run_in_hf_home

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_imtuneTestSecret0123456789"


def _run(args, hf_home, offline=True, **env):
    return run_in_hf_home(args, hf_home, SECRET, offline, **env)


@pytest.fixture
def hf_home(tmp_path, tiny_dir):
    home = tmp_path / "hf"
    put_in_hub_cache(home, "tiny-org/tiny-llama", tiny_dir)
    return home


def test_cached_hub_model_loads_offline_through_the_one_loader(hf_home, tmp_path):
    code = ("import json, imtune\n"
            "m, tok, dev = imtune.load_for_inference('tiny-org/tiny-llama', revision='main')\n"
            "print(json.dumps([type(m).__name__, str(dev), str(m.dtype), m.training, tok.chat_template is not None,"
            " str(imtune.resolve_model('tiny-org/tiny-llama'))]))\n")
    r = _run(["-c", code], hf_home)
    assert r.returncode == 0, r.stderr
    name, dev, dtype, training, has_template, path = json.loads(r.stdout.strip().splitlines()[-1])
    assert (name, dev, dtype, training, has_template) == ("LlamaForCausalLM", "cpu", "torch.float32", False, True)
    assert Path(path).is_relative_to(hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots")


def _data(tmp_path) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return data


def test_hub_id_on_the_command_line(hf_home, tmp_path):
    data = _data(tmp_path)
    r = _run(["-m", "imtune.cli.main", "stats", "--model", "tiny-org/tiny-llama", "--revision", "main",
              "--data", str(data), "--json"], hf_home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tiny-org/tiny-llama"


@pytest.mark.parametrize("offline", [True, False])
def test_not_cached_is_one_line_exit_2(tmp_path, offline):
    # Online case: the Hub endpoint is a closed loopback port, i.e. unreachable.
    env = {} if offline else {"HF_ENDPOINT": "http://127.0.0.1:9"}
    r = _run(["-m", "imtune.cli.main", "inspect", "--model", "some-org/not-cached", "--data", str(_data(tmp_path))],
             tmp_path / "empty-hf", offline=offline, **env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "some-org/not-cached is not in the Hugging Face cache" in lines[0]
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in lines[0]
    assert "Traceback" not in r.stderr and SECRET not in r.stderr + r.stdout


def test_hub_repo_with_only_pickle_weights_is_refused(tmp_path, tiny_dir):
    files = pickle_only_copy(tiny_dir, tmp_path / "files")
    put_in_hub_cache(tmp_path / "hf", "tiny-org/pickled", files)
    r = _run(["-m", "imtune.cli.main", "inspect", "--model", "tiny-org/pickled", "--data",
              str(_data(tmp_path))], tmp_path / "hf")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "only pickle weights (pytorch_model.bin)" in r.stderr and "safetensors only" in r.stderr


def test_revision_is_for_hub_ids_only(tiny_dir):
    from imtune.errors import ImtuneError
    from imtune.models import resolve_model

    with pytest.raises(ImtuneError, match="--revision applies to Hub ids"):
        resolve_model(str(tiny_dir), revision="main")


def test_hub_download_fetches_only_safe_files():
    from fnmatch import fnmatch

    from imtune.models import HUB_FILES

    def fetched(name):
        return any(fnmatch(name, pat) for pat in HUB_FILES)

    for name in ["config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "special_tokens_map.json"]:
        assert fetched(name), name
    for name in ["pytorch_model.bin", "model.pt", "training_args.bin", "model.gguf", "modeling_x.py",
                 "onnx/model.onnx", "original/consolidated.00.pth"]:
        assert not fetched(name), name
