"""imtune: instruction tuning with exact per-token loss weights (IT, IM, weighted:λ).

Public API (imported lazily so `import imtune` stays light):
    load_records(path, format=None) -> list[Conversation]
    encode(records, tokenizer, objective="im", template="tulu", max_length=2048) -> list[Encoded]
    load_tokenizer(model), load_model(model)
    train(config) -> TrainResult
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_records": ("records.loading", "load_records"),
    "load_dataset": ("records.loading", "load_dataset"),
    "Conversation": ("records.conversation", "Conversation"),
    "Message": ("records.conversation", "Message"),
    "encode": ("masking.encoding", "encode"),
    "encode_with_report": ("masking.encoding", "encode_with_report"),
    "Encoded": ("masking.encoding", "Encoded"),
    "Objective": ("masking.objectives", "Objective"),
    "parse_objective": ("masking.objectives", "parse_objective"),
    "register_objective": ("masking.objectives", "register_objective"),
    "load_tokenizer": ("models", "load_tokenizer"),
    "load_model": ("models", "load_model"),
    "load_for_inference": ("models", "load_for_inference"),
    "resolve_model": ("models", "resolve_model"),
    "train": ("training.recipe", "train"),
    "TrainConfig": ("config", "TrainConfig"),
    "ImtuneError": ("errors", "ImtuneError"),
    "InputError": ("errors", "InputError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"imtune.{mod}"), attr)
    raise AttributeError(f"module 'imtune' has no attribute {name!r}")
