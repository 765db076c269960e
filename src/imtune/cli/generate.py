"""`imtune generate`: the model's reply to each record's prompt (the messages before its last assistant turn)."""

from __future__ import annotations

import sys

from imtune import ranges
from imtune.cli.common import add_data, add_model, add_overwrite, load_data

TEMPLATE_HELP = ("chat template: tulu, chatml, alpaca, or tokenizer (the model's own); default: the template the "
                 "model was trained with when --model is an 'imtune train' output directory, else tulu")


def add_template(p) -> None:
    p.add_argument("--template", default=None, help=TEMPLATE_HELP)


def add_runtime(p, batch_size: int = 8) -> None:
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", dest="batch_size", type=ranges.COUNT, default=batch_size,
                   help=f"examples per forward pass (default: {batch_size})")


def add_n(p) -> None:
    p.add_argument("--n", type=ranges.COUNT, default=None, help="use only the first N records (default: all)")


def load_model_and_tokenizer(args):
    from imtune.errors import ImtuneError
    from imtune.models import load_for_inference

    if getattr(args, "batch_size", 1) < 1:
        raise ImtuneError("--batch-size must be at least 1")
    model, tok, _ = load_for_inference(args.model, dtype=args.dtype, device=args.device,
                                       trust_remote_code=args.trust_remote_code, revision=args.revision)
    return model, tok


def first_n(records, n):
    from imtune.errors import ImtuneError

    if n is None:
        return records
    if n < 1:
        raise ImtuneError("--n must be at least 1")
    return records[:n]


def add_parser(sub):
    p = sub.add_parser("generate", help="generate the model's replies to a dataset's prompts",
                       description="For each record, the prompt is its messages up to (not including) the last "
                                   "assistant turn, rendered with the chat template; the reply is generated "
                                   "(greedy unless --sample) and written as JSONL rows {id, prompt, reference, "
                                   "output}, where reference is the dataset's last assistant reply.")
    add_model(p)
    add_data(p)
    add_template(p)
    add_n(p)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=ranges.COUNT, default=256,
                   help="most tokens per reply (default: 256)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=ranges.TEMPERATURE, default=0.7, help="sampling temperature with --sample (default: 0.7)")
    p.add_argument("--top-p", dest="top_p", type=ranges.TOP_P, default=0.9, help="nucleus top-p with --sample (default: 0.9)")
    p.add_argument("--seed", type=ranges.SEED, default=0, help="sampling seed (default: 0)")
    add_runtime(p)
    p.add_argument("--out", default="gen.jsonl", help="output JSONL file (default: gen.jsonl)")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from imtune.io_utils import atomic_write_jsonl, prepare_output

    prepare_output(args.out, (args.data, args.model), example="gen.jsonl", overwrite=args.overwrite)
    records = first_n(load_data(args), args.n)
    rows = generate_rows(args, records)
    atomic_write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} generation(s) to {args.out}", file=sys.stderr)
    return 0


def generate_rows(args, records, do_sample: bool | None = None) -> list[dict]:
    """Load the model named by `args`, reply to each record's prompt, and return `{id, prompt, reference, output}`."""
    from imtune.errors import ImtuneError, InputError
    from imtune.evaluation.chat_generation import generate_chat, split_last_turn
    from imtune.evaluation.loss_probe import default_template

    prompts, refs = [], []
    for r in records:
        try:
            prompt, ref = split_last_turn(r)
        except ImtuneError as e:
            raise InputError(args.data, str(e), record=r.id) from None
        prompts.append(prompt)
        refs.append(ref)
    template = default_template(args.model, args.template)
    model, tok = load_model_and_tokenizer(args)
    sample = args.sample if do_sample is None else do_sample
    outs = generate_chat(model, tok, prompts, template=template, max_new_tokens=args.max_new_tokens,
                         do_sample=sample, temperature=getattr(args, "temperature", 0.7),
                         top_p=getattr(args, "top_p", 0.9), batch_size=args.batch_size,
                         seed=getattr(args, "seed", 0))
    return [{"id": r.id, "prompt": p, "reference": ref, "output": o}
            for r, p, ref, o in zip(records, prompts, refs, outs, strict=True)]
