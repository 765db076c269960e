"""`imtune judge alpaca-eval|mt-bench`: LLM-judged evaluation against any OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imtune import ranges
from imtune.cli.common import add_overwrite, add_revision
from imtune.errors import ImtuneError
from imtune.io_utils import prepare_output

EXAMPLES = """examples:
  imtune judge alpaca-eval --outputs outs.jsonl --judge-base-url http://localhost:8000/v1 --judge-model qwen2.5-72b
  imtune judge alpaca-eval --model runs/lima-im --reference 2.0 --judge-base-url https://api.openai.com/v1 \\
      --judge-model gpt-4-1106-preview --limit 100 --out results/lima-im
  imtune judge mt-bench --answers answers.jsonl --judge-base-url http://localhost:8000/v1 --judge-model m
  imtune judge mt-bench --model runs/lima-im --judge-base-url https://api.openai.com/v1 --judge-model gpt-4

The API key comes from $IMTUNE_JUDGE_API_KEY, else $OPENAI_API_KEY (local servers usually need none);
--judge-base-url and --judge-model default to $IMTUNE_JUDGE_BASE_URL and $IMTUNE_JUDGE_MODEL.
Judgements are cached (see --judge-cache): a rerun asks the judge only what it has not answered before.
"""


def _add_judge_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge")
    g.add_argument("--judge-base-url", default=os.environ.get("IMTUNE_JUDGE_BASE_URL"),
                   help="OpenAI-compatible API base, e.g. http://localhost:8000/v1 ($IMTUNE_JUDGE_BASE_URL)")
    g.add_argument("--judge-model", default=os.environ.get("IMTUNE_JUDGE_MODEL"),
                   help="judge model name as the server knows it ($IMTUNE_JUDGE_MODEL)")
    g.add_argument("--judge-max-tokens", type=ranges.COUNT, default=1024, help="max tokens per judge reply (default: 1024)")
    g.add_argument("--judge-concurrency", type=ranges.COUNT, default=8, help="requests in flight at once (default: 8)")
    g.add_argument("--judge-timeout", type=ranges.TIMEOUT_S, default=120.0, help="seconds per attempt (default: 120)")
    g.add_argument("--judge-deadline", type=ranges.DEADLINE_S, default=600.0,
                   help="seconds per request, retries and Retry-After waits included (default: 600)")
    g.add_argument("--judge-max-retries", type=ranges.INDEX, default=6,
                   help="retries on 429/5xx/connection errors/timeouts, with exponential back-off (default: 6)")
    g.add_argument("--judge-cache", default=None,
                   help="sqlite cache of judgements (default: ~/.cache/imtune/judge_cache.sqlite3, "
                        "or $IMTUNE_CACHE/judge_cache.sqlite3)")
    g.add_argument("--no-judge-cache", action="store_true", help="neither read nor write the cache")


def _add_generation_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"generating {what} with --model")
    add_revision(g)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the model directory (off by default)")
    g.add_argument("--template", default=None,
                   help="chat template: tulu, chatml, alpaca or tokenizer (default: the model's training template)")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=ranges.COUNT, default=1024,
                   help="max tokens per generated answer (default: 1024)")
    g.add_argument("--batch-size", dest="batch_size", type=ranges.COUNT, default=8, help="generation batch size (default: 8)")
    g.add_argument("--dtype", default=None,
                   help="model dtype (default: bfloat16 on a GPU that supports it, else float32)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "judge", help="LLM-judged evaluation: AlpacaEval-style win rate, MT-Bench scores",
        description="Judge a model's answers with an LLM behind any OpenAI-compatible chat-completions API.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run, _judge_parser=p)
    sub = p.add_subparsers(dest="judge_command", metavar="<benchmark>")

    a = sub.add_parser(
        "alpaca-eval", help="pairwise win rate against AlpacaEval's reference outputs",
        description="Win rate of the model's outputs against text-davinci-003 (reference 1.0) or GPT-4-turbo "
                    "(2.0) on the 805 AlpacaEval instructions; each pair is judged in both orders. Not the "
                    "length-controlled win rate.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--outputs", help="model outputs: .jsonl or .json of {instruction, output}")
    src.add_argument("--model", help="generate the outputs with this model (Hub id, alias, directory or .gguf) first")
    a.add_argument("--reference", choices=["1.0", "2.0"], default="1.0",
                   help="1.0: text-davinci-003, 2.0: gpt-4-1106-preview (default: 1.0)")
    a.add_argument("--limit", type=ranges.COUNT, default=None, help="only the first N instructions")
    a.add_argument("--out", default="judge_results/alpaca_eval",
                   help="output directory (default: judge_results/alpaca_eval)")
    add_overwrite(a)
    _add_judge_options(a)
    _add_generation_options(a, "outputs")
    a.set_defaults(judge_func=run_alpaca_eval)

    m = sub.add_parser(
        "mt-bench", help="MT-Bench single-answer grading (1-10 per turn)",
        description="Grade both turns of the 80 MT-Bench questions with FastChat's judge prompts (reference "
                    "answers for math, reasoning and coding).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--answers", help="answers: .jsonl of {question_id, turns: [a1, a2]}")
    src.add_argument("--model", help="generate the answers with this model (Hub id, alias, directory or .gguf) first")
    m.add_argument("--limit", type=ranges.COUNT, default=None, help="only the first N questions")
    m.add_argument("--out", default="judge_results/mt_bench", help="output directory (default: judge_results/mt_bench)")
    add_overwrite(m)
    _add_judge_options(m)
    _add_generation_options(m, "answers")
    m.set_defaults(judge_func=run_mt_bench)


def run(args) -> int:
    fn = getattr(args, "judge_func", None)
    if fn is None:
        args._judge_parser.print_help()
        return 0
    return fn(args)


# ------------------------------------------------------------------------------------------------ helpers


def make_client(args):
    from imtune.evaluation.judge.client import JudgeClient

    if not args.judge_base_url:
        raise ImtuneError("no judge endpoint: pass --judge-base-url (or set IMTUNE_JUDGE_BASE_URL)")
    if not args.judge_model:
        raise ImtuneError("no judge model: pass --judge-model (or set IMTUNE_JUDGE_MODEL)")
    if args.judge_max_tokens < 1:
        raise ImtuneError("--judge-max-tokens must be >= 1")
    cache = False if args.no_judge_cache else args.judge_cache
    return JudgeClient(args.judge_base_url, args.judge_model, max_tokens=args.judge_max_tokens,
                       timeout=args.judge_timeout, deadline=args.judge_deadline,
                       max_retries=args.judge_max_retries, concurrency=args.judge_concurrency, cache=cache)


def make_generator(args):
    """conversations -> replies with the model named by --model, on a GPU when there is one."""

    from imtune.evaluation.chat_generation import generate_chat
    from imtune.models import load_for_inference

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ImtuneError("--max-new-tokens and --batch-size must be >= 1")
    model, tok, device = load_for_inference(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                            revision=args.revision)
    print(f"loaded {args.model} ({str(model.dtype).removeprefix('torch.')}, {device})", file=sys.stderr)

    def generate(conversations):
        return generate_chat(model, tok, conversations, template=args.template, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, progress=sys.stderr.isatty())

    return generate


def _judge_line(client) -> str:
    s = client.stats
    return f"judge {client.model}: {s.requests} request(s), {s.retries} retr(y/ies), {s.cache_hits} cache hit(s)"


def _require_verdicts(n_parsed: int, n_asked: int, written) -> None:
    """A run whose judge never gave a usable verdict is a failure, not a score (the files stay for a look)."""
    if n_asked and not n_parsed:
        raise ImtuneError(f"no judge reply could be parsed ({n_asked} of {n_asked} unparseable, nothing cached); "
                          f"check --judge-model and the replies in {written}")


# ------------------------------------------------------------------------------------------------ benchmarks


def run_alpaca_eval(args) -> int:
    from imtune.evaluation.judge import alpaca_eval as ae
    from imtune.io_utils import atomic_write_json

    if args.limit is not None and args.limit < 1:
        raise ImtuneError("--limit must be >= 1")
    names = ("alpaca_eval_results.json", "alpaca_eval_annotations.jsonl") + (("model_outputs.json",) if args.model
                                                                              else ())
    out = prepare_output(Path(args.out), (args.outputs, args.model), kind="dir", names=names,
                         overwrite=args.overwrite)
    client = make_client(args)  # before generating: a bad URL should fail in seconds, not after an hour
    with client:
        if args.model:
            instructions = ae.alpaca_eval_instructions(args.limit)
            print(f"generating {len(instructions)} AlpacaEval outputs with {args.model}", file=sys.stderr)
            outputs = ae.generate_outputs(make_generator(args), instructions, generator=str(args.model))
            path = atomic_write_json(out / "model_outputs.json", outputs)
            print(f"wrote {path}", file=sys.stderr)
        else:
            outputs = ae.load_model_outputs(args.outputs)
        pairs, missing = ae.pair_with_reference(outputs, args.reference, args.limit)
        if missing:
            print(f"warning: no output for {len(missing)} of {len(pairs) + len(missing)} instructions; the win "
                  "rate covers the rest only", file=sys.stderr)
        res = ae.evaluate_outputs(client, outputs, args.reference, args.limit)
        res.summary["outputs"] = str(args.outputs or out / "model_outputs.json")
        paths = ae.write_results(out, res)
        print(res.format())
        print(_judge_line(client))
        print(f"wrote {paths['results']} and {paths['annotations']}")
        s = res.summary
        _require_verdicts(s["n_judgements"] - s["n_unparseable"], s["n_judgements"], paths["annotations"])
    return 0


def run_mt_bench(args) -> int:
    from imtune.evaluation.judge import mt_bench as mb
    from imtune.io_utils import atomic_write_jsonl

    questions = mb.load_questions(args.limit)
    names = ("mt_bench_results.json", "mt_bench_judgements.jsonl") + (("mt_bench_answers.jsonl",) if args.model
                                                                      else ())
    out = prepare_output(Path(args.out), (args.answers, args.model), kind="dir", names=names,
                         overwrite=args.overwrite)
    client = make_client(args)
    with client:
        if args.model:
            print(f"generating answers to {len(questions)} MT-Bench questions (2 turns) with {args.model}",
                  file=sys.stderr)
            rows = mb.generate_answers(make_generator(args), questions)
            path = atomic_write_jsonl(out / "mt_bench_answers.jsonl",
                                      [{**r, "model_id": str(args.model)} for r in rows])
            print(f"wrote {path}", file=sys.stderr)
            answers = {r["question_id"]: r["turns"] for r in rows}
        else:
            answers = mb.load_answers(args.answers)
        res = mb.grade(client, answers, questions)
        if res.summary["n_missing"]:
            print(f"warning: no answers for {res.summary['n_missing']} of {len(questions)} questions",
                  file=sys.stderr)
        res.summary["answers"] = str(args.answers or out / "mt_bench_answers.jsonl")
        paths = mb.write_results(out, res)
        print(res.format())
        print(_judge_line(client))
        print(f"wrote {paths['results']} and {paths['judgements']}")
        _require_verdicts(res.summary["n_rated"], res.summary["n_judgements"], paths["judgements"])
    return 0
