"""Flags spelled the same in every subcommand."""

from __future__ import annotations

import argparse

from imtune import ranges
from imtune.config import (
    DATA_HELP,
    DEFAULT_DATA_SPLIT,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MODEL,
    DEFAULT_OBJECTIVE,
    DEFAULT_TEMPLATE,
)

MODEL_HELP = ("Hugging Face Hub id (ORG/NAME, fetched once into the standard HF cache), alias (smollm2-135m, "
              "gemma3-270m), local model directory, or .gguf file")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    add_revision(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the model directory (off by default)")


def add_revision(p) -> None:
    p.add_argument("--revision", default=None,
                   help="with a Hub id: branch, tag or commit to use (default: main)")


def add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs an earlier imtune run wrote there (a file imtune did not write is never "
                        "replaced)")


def add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help=DATA_HELP)
    add_data_source(p)
    p.add_argument("--data-format", dest="data_format", default=None,
                   choices=["messages", "sharegpt", "alpaca", "prompt_completion"],
                   help="force the record schema instead of auto-detecting it")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip bad records (and report which) instead of stopping at the first one")


def add_data_source(p) -> None:
    """--data-split / --data-config / --data-revision: which part of a Hub dataset or dataset directory."""
    p.add_argument("--data-split", dest="data_split", default=DEFAULT_DATA_SPLIT,
                   help=f"with a Hub id or dataset directory: the split to use (default: {DEFAULT_DATA_SPLIT})")
    p.add_argument("--data-config", dest="data_config", default=None,
                   help="with a Hub id or dataset directory: the configuration (subset) to use")
    p.add_argument("--data-revision", dest="data_revision", default=None,
                   help="with a Hub dataset id: branch, tag or commit to use (default: main)")


def data_source(args) -> dict:
    """The split / config / revision keywords of `load_dataset` that the flags set (others keep their defaults)."""
    given = {"split": getattr(args, "data_split", DEFAULT_DATA_SPLIT), "config": getattr(args, "data_config", None),
             "revision": getattr(args, "data_revision", None)}
    return {k: v for k, v in given.items() if v is not None and not (k == "split" and v == DEFAULT_DATA_SPLIT)}


def add_objective(p: argparse.ArgumentParser, default: str = DEFAULT_OBJECTIVE) -> None:
    p.add_argument("--objective", default=default,
                   help="it | im | im-all | weighted:λ[:ρ]; suffix @last to train only the last assistant turn "
                        f"(default: {default})")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="tulu (the paper's), chatml, alpaca, or tokenizer (the model's own chat template); "
                        f"default: {DEFAULT_TEMPLATE}")
    p.add_argument("--max-length", dest="max_length", type=ranges.LENGTH, default=DEFAULT_MAX_LENGTH,
                   help=f"truncate examples to this many tokens (default: {DEFAULT_MAX_LENGTH})")
    p.add_argument("--truncation-side", dest="truncation_side", choices=["right", "left"], default="right",
                   help="which end to cut when an example is longer than --max-length (default: right)")


def add_token_count_options(p: argparse.ArgumentParser) -> None:
    """--template and --max-length for commands that count tokens the way training would (stats, advise)."""
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"template used for token counts (default: {DEFAULT_TEMPLATE})")
    p.add_argument("--max-length", dest="max_length", type=ranges.LENGTH, default=DEFAULT_MAX_LENGTH,
                   help=f"report how many examples this length would truncate/drop (default: {DEFAULT_MAX_LENGTH})")


def load_data(args):
    """Load records per the common flags, printing a one-line note about skipped records."""

    from imtune.records.loading import load_dataset

    res = load_dataset(args.data, format=args.data_format, skip_invalid=args.skip_invalid, **data_source(args))
    _note_skipped(res.skipped, args.data)
    return res.records


def load_data_table(args):
    """The canonical Arrow table of --data (memory-mapped, built once per content; what `stats` and `advise` read at
    any size), printing the same one-line note about skipped records as `load_data`."""
    from imtune.masking.encode_cache import tables_dir
    from imtune.records.sources import DataSpec, conversation_table

    table = conversation_table(DataSpec.of(args), skip_invalid=args.skip_invalid, cache_dir=tables_dir())
    _note_skipped(table.skipped_errors(), args.data)
    return table


def _note_skipped(skipped, name: str) -> None:
    import sys

    from imtune.records.loading import describe_skipped

    if skipped:  # the line `train` prints too: counts per reason, then the first rows of each
        print(describe_skipped(skipped, name), file=sys.stderr)
