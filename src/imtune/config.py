"""`TrainConfig`: the one place where training options and their defaults live.

The dataclass is the single source of truth: YAML files are read into it (unknown keys are refused with a "did you
mean" hint), the `imtune train` flags are generated from its fields (so every field can be overridden on the command
line), and the resolved config is written back to `imtune_config.yaml` in the output directory.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from imtune import ranges
from imtune.errors import ImtuneError
from imtune.inputs import stat_input

CHOICES = {
    "data_format": ("messages", "sharegpt", "alpaca", "prompt_completion"),
    "truncation_side": ("right", "left"),
    "lr_scheduler": ("linear", "cosine", "constant"),
    "loss_normalization": ("weight", "tokens"),
    "precision": ("auto", "fp32", "bf16"),
    "kl_type": ("target_token", "full"),
    "kernels": ("auto", "none", "liger"),
}


# Defaults shared with functions and commands outside TrainConfig (encode, the loss probe, stats, every
# subcommand's --model): they refer to these names so a default changes in one place.
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEMPLATE = "tulu"
DEFAULT_OBJECTIVE = "im"
DEFAULT_MAX_LENGTH = 2048
DEFAULT_TRUNCATION_SIDE = "right"
DEFAULT_DATA_SPLIT = "train"  # the split of a Hub dataset or dataset directory given as --data
DATA_HELP = ("data file (.jsonl, .json, .csv, .parquet), Hugging Face Hub dataset id (ORG/NAME or "
             "hf://datasets/ORG/NAME, fetched once into the standard HF cache), or a dataset directory "
             "(save_to_disk, or a folder of data files)")
# `imtune advise --pilot`'s wall-clock budget: ~10 minutes of a 135M model on 2 CPU cores (its cost model plans to it)
DEFAULT_PILOT_BUDGET_MIN = 10.0
# Run trackers (`report_to`) and the pip extra that installs each; tensorboard is a core dependency.
TRACKERS = {"tensorboard": None, "wandb": "wandb", "mlflow": "mlflow"}
DEFAULT_REPORT_TO = ("tensorboard",)
DEFAULT_TRACKING_PROJECT = "imtune"  # wandb project / MLflow experiment when neither the config nor the env names one


# The range of every numeric option (imtune/ranges.py): its flag's argparse type, and what `validate` checks in a
# YAML config.
FIELD_RANGES = {
    "seed": ranges.SEED, "max_length": ranges.LENGTH, "epochs": ranges.COUNT, "micro_batch_size": ranges.COUNT,
    "lora_r": ranges.COUNT, "loss_chunk_size": ranges.COUNT, "logging_steps": ranges.COUNT, "max_steps": ranges.COUNT,
    "gradient_accumulation_steps": ranges.COUNT, "global_batch_size": ranges.COUNT, "num_proc": ranges.COUNT,
    "save_steps": ranges.INDEX, "save_total_limit": ranges.INDEX, "lr": ranges.POSITIVE, "lora_alpha": ranges.POSITIVE,
    "warmup_ratio": ranges.UNIT, "lora_dropout": ranges.UNIT, "adam_beta1": ranges.UNIT, "adam_beta2": ranges.UNIT,
    "val_fraction": ranges.UNIT, "weight_decay": ranges.NON_NEGATIVE, "max_grad_norm": ranges.NON_NEGATIVE,
    "neftune_alpha": ranges.NON_NEGATIVE, "kl_coef": ranges.NON_NEGATIVE, "adam_epsilon": ranges.NON_NEGATIVE,
}


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # model
    model: str = _f(DEFAULT_MODEL, "Hugging Face Hub id (ORG/NAME), alias (smollm2-135m, gemma3-270m), local "
                                   "model directory, or .gguf file")
    revision: str | None = _f(None, "with a Hub id: branch, tag or commit to use (default: main)")
    trust_remote_code: bool = _f(False, "allow custom model code from the model directory")
    attn_implementation: str | None = _f(None, "eager, sdpa or flash_attention_2 (default: the model's own choice)")

    # data
    data: str | None = _f(None, f"training {DATA_HELP} (required); in YAML also a list of sources, each "
                                "{path, n or fraction, objective, split, config, revision} (see docs/TRAINING.md)")
    data_split: str = _f(DEFAULT_DATA_SPLIT, "with a Hub id or dataset directory: the split to use")
    data_config: str | None = _f(None, "with a Hub id or dataset directory: the configuration (subset) to use")
    data_revision: str | None = _f(None, "with a Hub dataset id: branch, tag or commit to use (default: main)")
    data_format: str | None = _f(None, "force the record schema instead of auto-detecting it")
    skip_invalid: bool = _f(False, "skip bad records (and report which) instead of stopping at the first one")
    objective: str = _f(DEFAULT_OBJECTIVE, "it | im | im-all | weighted:λ[:ρ], optionally suffixed @last")
    template: str = _f(DEFAULT_TEMPLATE, "tulu (the paper's), chatml, alpaca, or tokenizer (the model's own chat template)")
    max_length: int = _f(DEFAULT_MAX_LENGTH, "truncate examples to this many tokens")
    truncation_side: str = _f(DEFAULT_TRUNCATION_SIDE, "which end of an over-long example to cut")
    allow_special_tokens_in_content: bool = _f(
        False, "let special-token text typed inside a message (e.g. <|im_end|>) become the special token")
    val_data: str | None = _f(None, "held-out data file, evaluated each epoch on output-only (it) loss")
    val_fraction: float = _f(0.0, "hold out this fraction of --data instead (split deterministically by --seed)")
    encode_cache: bool = _f(True, "encode once into a memory-mapped Arrow cache that later runs with the same data, "
                                  "tokenizer, template and max length reuse (any objective); off: encode in memory")
    encode_cache_dir: str | None = _f(None, "where the encode cache lives (default: $IMTUNE_ENCODE_CACHE, else "
                                            "$HF_HOME/imtune/encoded)")
    num_proc: int | None = _f(None, "processes that encode the data (default: the CPU cores)")

    # optimisation
    epochs: int = _f(2, "passes over the training data")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides --epochs for the schedule)")
    lr: float = _f(2e-5, "peak learning rate")
    lr_scheduler: str = _f("linear", "decay after warm-up")
    warmup_ratio: float = _f(0.03, "fraction of the optimizer steps spent warming up linearly from 0")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only; biases and norms never decay)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0 turns clipping off)")
    micro_batch_size: int = _f(4, "examples per forward/backward pass on each process")
    gradient_accumulation_steps: int | None = _f(
        None, "micro-batches per optimizer step on each process (default: from --global-batch-size, else 1)")
    global_batch_size: int | None = _f(
        None, "examples per optimizer step over all processes; sets gradient accumulation")
    loss_normalization: str = _f("weight", "divide the step's weighted loss sum by its total weight, or by its "
                                           "number of tokens with non-zero weight")
    seed: int = _f(42, "seed for initialisation, data order, validation split and dropout")
    precision: str = _f("auto", "bf16 autocast (fp32 master weights) or fp32; auto: bf16 where the device computes it "
                                "natively (bf16 CPU instructions, a bf16 GPU), else fp32")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    group_by_length: bool = _f(True, "batch examples of similar length together to cut padding")
    packing: bool = _f(False, "pack several examples into each sequence (models whose attention honours "
                              "position_ids only)")
    padding_free: bool | None = _f(None, "run each micro-batch as one unpadded row (same examples per step); default "
                                         "auto: on with a variable-length attention kernel (flash-attention)")
    kernels: str = _f("auto", "fused GPU kernels: liger (Liger-Kernel fused lm_head + CE with exact token weights, "
                              "RMSNorm/SwiGLU/RoPE), none, or auto: liger on a CUDA device where it is installed")
    loss_chunk_size: int = _f(1024, "tokens per chunk when computing the loss (bounds the logits' memory)")
    neftune_alpha: float = _f(0.0, "NEFTune embedding noise scale (0 = off; the paper used 5)")
    kl_coef: float = _f(0.0, "weight of a KL penalty towards the starting model (0 = off)")
    kl_type: str = _f("target_token", "KL on the target token's log-probability, or over the full vocabulary")

    # LoRA
    lora: bool = _f(False, "train LoRA adapters instead of all weights")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input")
    lora_target_modules: str = _f("all-linear", "comma-separated module names, or all-linear")
    merge: bool = _f(False, "with --lora: save the merged full model instead of the adapter")

    # output
    out: str | None = _f(None, "output directory (required)")
    overwrite: bool = _f(False, "remove what imtune wrote in a non-empty output directory (refused if it "
                                         "holds anything imtune did not write)")
    resume: str | None = _f(None, "resume from 'latest' checkpoint in --out, or from a checkpoint directory")
    checkpoints: bool = _f(True, "save resumable checkpoints (epoch ends, --save-steps); off: a killed run starts "
                                 "over (for short throwaway runs, such as advise --pilot's)")
    save_steps: int = _f(0, "also save a checkpoint every N optimizer steps (0 = only at epoch ends)")
    save_total_limit: int = _f(2, "keep only the newest N checkpoints (0 = keep all)")
    logging_steps: int = _f(1, "write a metrics row every N optimizer steps")
    progress: bool = _f(True, "show a progress bar")

    # tracking
    report_to: list[str] = field(default_factory=lambda: list(DEFAULT_REPORT_TO), metadata={
        "help": "comma-separated run trackers: tensorboard, wandb (offline unless WANDB_MODE says otherwise), "
                "mlflow (a file store in the output directory unless MLFLOW_TRACKING_URI is set), or none"})
    run_name: str | None = _f(None, "run name in wandb / MLflow (default: the output directory's name)")
    wandb_project: str | None = _f(None, f"wandb project (default: $WANDB_PROJECT, else {DEFAULT_TRACKING_PROJECT})")
    mlflow_experiment: str | None = _f(None, "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, else "
                                             f"{DEFAULT_TRACKING_PROJECT})")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        if not isinstance(d, dict):
            raise ImtuneError(f"{source}: expected a mapping of option: value, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in d.items():
            name = str(key).replace("-", "_")
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                raise ImtuneError(f"{source}: unknown option {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
            values[name] = coerce(name, value, _types()[name], source)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        from imtune.inputs import read_yaml

        if stat_input(path) is None:
            raise ImtuneError(f"{path}: config file not found")
        return cls.from_dict(read_yaml(path) or {}, source=str(path))

    @classmethod
    def coerce(cls, config: TrainConfig | dict | str | Path) -> TrainConfig:
        if isinstance(config, TrainConfig):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if isinstance(config, (str, Path)):
            return cls.from_yaml(config)
        raise ImtuneError(f"config must be a TrainConfig, a dict or a YAML path, not {type(config).__name__}")

    def replace(self, **overrides) -> TrainConfig:
        return TrainConfig.from_dict({**asdict(self), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    # ---- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise `ImtuneError` (one line) for the first bad value; returns self for chaining."""
        from imtune.masking.objectives import parse_objective

        for name, allowed in CHOICES.items():
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise ImtuneError(f"{name}: {v!r} is not one of {', '.join(allowed)}")
        if not self.data:
            raise ImtuneError("data: no training data given (use --data FILE or --data ORG/NAME)")
        if not self.out:
            raise ImtuneError("out: no output directory given (use --out DIR)")
        parse_objective(self.objective)
        for k, src in enumerate(self.sources()):
            if src.get("objective"):
                try:
                    parse_objective(src["objective"])
                except ImtuneError as e:  # name the source: several may carry objectives
                    raise ImtuneError(f"data[{k}] {src['path']}: {e}") from None
        for name, allowed_range in FIELD_RANGES.items():
            allowed_range.check(name, getattr(self, name))
        if self.val_fraction and self.val_data:
            raise ImtuneError("give either val_fraction or val_data, not both")
        if self.merge and not self.lora:
            raise ImtuneError("merge only applies to LoRA training (add --lora)")
        if not self.lora_target_modules.strip():
            raise ImtuneError("lora_target_modules is empty (use all-linear or a comma-separated list)")
        _check_trackers(self.report_to)
        return self

    def sources(self) -> list[dict]:
        """The training data as sources ({path, n, fraction, objective, split, config, revision}); one for a plain
        `data` string (its split/config/revision from the data_* options)."""
        if isinstance(self.data, list):
            return self.data
        return [{"path": self.data, "split": self.data_split, "config": self.data_config,
                 "revision": self.data_revision}] if self.data else []

    def data_paths(self) -> list[str]:
        return [str(s["path"]) for s in self.sources()]

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each process, checked against `global_batch_size`."""
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        if self.global_batch_size % per_pass:
            raise ImtuneError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size} x {world_size} process(es)")
        accum = self.global_batch_size // per_pass
        if self.gradient_accumulation_steps not in (None, accum):
            raise ImtuneError(f"gradient_accumulation_steps {self.gradient_accumulation_steps} contradicts "
                              f"global_batch_size {self.global_batch_size} (which needs {accum} with "
                              f"micro_batch_size {self.micro_batch_size} x {world_size} process(es))")
        return accum


def _check_trackers(report_to: list[str]) -> None:
    """Known names, and each tracker importable: a missing one stops the run before any work, not after it."""
    import importlib.util

    for name in report_to:
        if name == "none":
            raise ImtuneError("report_to: none turns tracking off and cannot be combined with a tracker")
        if name not in TRACKERS:
            raise ImtuneError(f"report_to: {name!r} is not one of {', '.join(TRACKERS)}, none")
        try:
            missing = TRACKERS[name] is not None and importlib.util.find_spec(name) is None
        except ValueError:  # imported already, without a spec: it is there
            missing = False
        if missing:
            raise ImtuneError(f"report_to: {name} is not installed; pip install 'imtune[{TRACKERS[name]}]'")


def _string_list(value) -> list[str]:
    """`a,b` or a YAML list -> ["a", "b"] (lower case, duplicates dropped); `none` alone -> []."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ValueError
    out = list(dict.fromkeys(v.strip().lower() for v in items if v.strip()))
    return [] if out == ["none"] else out


# ---- types ----------------------------------------------------------------------------------------------------------
_TYPES: dict[str, tuple[type, bool]] | None = None


def _types() -> dict[str, tuple[type, bool]]:
    """field name -> (base type, optional)."""
    global _TYPES
    if _TYPES is None:
        hints = typing.get_type_hints(TrainConfig)
        out = {}
        for name, t in hints.items():
            args = typing.get_args(t)
            if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
                base = next(a for a in args if a is not type(None))
                out[name] = (base, type(None) in args)
            else:
                out[name] = (t, False)
        _TYPES = out
    return _TYPES


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(name: str, value, spec: tuple[type, bool], source: str = "config"):
    """Convert a YAML/CLI value to the field's type; PyYAML reads `1e-5` as a string, so numbers in strings count."""
    base, optional = spec
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ImtuneError(f"{source}: {name} cannot be empty")
    try:
        if typing.get_origin(base) is list:
            return _string_list(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (list, tuple)) and name == "data":
                return data_sources(value, source)
            if isinstance(value, (list, tuple)) and name == "lora_target_modules":
                return ",".join(str(v) for v in value)
            if isinstance(value, (dict, list, tuple)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            base, "a comma-separated list of names")
        raise ImtuneError(f"{source}: {name} must be {kind}, got {value!r}") from None
    raise AssertionError(f"unhandled type {base} for {name}")  # pragma: no cover


SOURCE_KEYS = {"path": (str, False), "n": (int, True), "fraction": (float, True), "objective": (str, True),
               "split": (str, True), "config": (str, True), "revision": (str, True)}


def data_sources(value, where: str = "config") -> list[dict]:
    """A YAML `data:` list checked: each entry a path, or {path, n (examples sampled by --seed) or fraction (of the
    source), objective (for its examples; default: the run's), a Hub dataset's split / config / revision}."""
    out = []
    if not value:
        raise ImtuneError(f"{where}: data[0] missing: the data: list is empty; give at least one source")
    for i, s in enumerate(value):
        at = f"{where}: data[{i}]"
        s = {"path": s} if isinstance(s, str) else s
        unknown = sorted(map(str, set(s) - set(SOURCE_KEYS))) if isinstance(s, dict) else []
        if unknown:
            hint = difflib.get_close_matches(unknown[0], SOURCE_KEYS, n=1)
            raise ImtuneError(f"{at}: unknown key {unknown[0]!r}" + (f"; did you mean {hint[0]!r}?" if hint else
                                                                       f" (keys: {', '.join(SOURCE_KEYS)})"))
        if not isinstance(s, dict) or not s.get("path"):
            raise ImtuneError(f"{at} must be a path or a mapping with a path and any of {', '.join(SOURCE_KEYS)}")
        d = {k: coerce(k, v, SOURCE_KEYS[k], at) for k, v in s.items() if v is not None}
        if d.get("n", 1) < 1 or not 0 < d.get("fraction", 1) <= 1 or {"n", "fraction"} <= set(d):
            raise ImtuneError(f"{at}: give n >= 1 or a fraction in (0, 1], not both")
        out.append(d)
    return out


# ---- command line ---------------------------------------------------------------------------------------------------
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field, spelled like the field (`max_steps` -> `--max-steps`). Defaults are suppressed so a flag
    that is not given leaves the YAML value (or the dataclass default) alone. `exclude`: fields a caller owns."""
    spec = _types()
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        base, _ = spec[f.name]
        default = f.default if f.default is not MISSING else None
        if f.default_factory is not MISSING:
            default = ",".join(f.default_factory())
        help_ = f.metadata.get("help", "")
        if f.name in CHOICES:
            help_ += f"; one of {', '.join(CHOICES[f.name])}"
        help_ += f" (default: {default})" if default not in (None, "") else ""
        help_ = help_.replace("%", "%%")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        if f.name in FIELD_RANGES:  # refused while the command line is parsed, before anything is imported
            kw["type"] = _range_type(FIELD_RANGES[f.name], optional=spec[f.name][1])
        if base is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "resume":
            p.add_argument(flag(f.name), nargs="?", const="latest", metavar="CHECKPOINT", **kw)
        else:
            p.add_argument(flag(f.name), metavar=f.name.upper(), **kw)


def _range_type(allowed, optional: bool):
    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        return allowed(text)

    parse.__name__ = allowed.describe()
    return parse


def config_from_args(args: argparse.Namespace, config_path: str | None = None) -> TrainConfig:
    base = TrainConfig.from_yaml(config_path).to_dict() if config_path else {}
    names = {f.name for f in fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    merged = {**base, **overrides}
    return TrainConfig.from_dict(merged, source="command line" if overrides else (config_path or "config"))
