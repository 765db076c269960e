"""Show exactly which tokens carry loss: rich text, JSON rows, or a self-contained HTML page."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

from imtune.masking.encoding import Encoded

SEGMENT_STYLE = {"template": "grey50", "system": "magenta", "user": "cyan", "assistant": "green", "eos": "bold red"}


def token_rows(e: Encoded, tokenizer) -> list[dict]:
    texts = [tokenizer.decode([i]) for i in e.input_ids]
    rows = [{"id": int(i), "text": t, "segment": s, "weight": float(w)}
            for i, t, s, w in zip(e.input_ids, texts, e.segments, e.weights, strict=True)]
    if e.message_weights is not None:  # the data's per-message weights, multiplied into `weight`
        for r, m, mw in zip(rows, e.turns.tolist(), e.message_weights.tolist(), strict=True):
            r["message"], r["message_weight"] = int(m), float(mw)
    return rows


def message_weights(e: Encoded) -> dict[int, float]:
    """{message index: weight} of the messages whose data weight is not 1 (0-based, as in `turns`)."""
    if e.message_weights is None:
        return {}
    out: dict[int, float] = {}
    for m, w in zip(e.turns.tolist(), e.message_weights.tolist(), strict=True):
        if m >= 0 and w != 1.0:
            out[int(m)] = float(w)
    return out


def example_totals(e: Encoded) -> dict:
    segs = e.segments
    by_seg: dict[str, dict] = {}
    for s, w in zip(segs, e.weights, strict=True):
        d = by_seg.setdefault(s, {"tokens": 0, "weighted_tokens": 0, "weight": 0.0})
        d["tokens"] += 1
        d["weighted_tokens"] += int(w > 0)
        d["weight"] = round(d["weight"] + w, 6)
    return {"tokens": len(e), "weighted_tokens": sum(1 for w in e.weights if w > 0),
            "total_weight": round(sum(e.weights), 6), "truncated": e.truncated, "by_segment": by_seg,
            "message_weights": message_weights(e)}


def to_json(examples: Sequence[Encoded], tokenizer, objective: str) -> str:
    return json.dumps([{"example": e.id, "objective": objective, "totals": example_totals(e),
                        "tokens": token_rows(e, tokenizer)} for e in examples], ensure_ascii=False, indent=1)


def print_rich(examples: Sequence[Encoded], tokenizer, objective: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    legend = Text("legend: ")
    for seg, style in SEGMENT_STYLE.items():
        legend.append(f" {seg} ", style=style)
    legend.append("   underlined/bold = carries loss (weight > 0); dim = weight 0")
    console.print(legend)
    for e in examples:
        t = Text()
        for row in token_rows(e, tokenizer):
            style = SEGMENT_STYLE[row["segment"]]
            if row["weight"] > 0:
                style += " bold underline"
                if row["weight"] < 1:
                    style += " italic"
            else:
                style += " dim"
            t.append(row["text"].replace("\n", "↵\n"), style=style)
        console.rule(f"example {e.id} · objective {objective}")
        console.print(t)
        tot = example_totals(e)
        table = Table("segment", "tokens", "weighted", "Σ weight", title=None, box=None)
        for seg, d in tot["by_segment"].items():
            table.add_row(seg, str(d["tokens"]), str(d["weighted_tokens"]), f"{d['weight']:g}")
        table.add_row("total", str(tot["tokens"]), str(tot["weighted_tokens"]), f"{tot['total_weight']:g}",
                      style="bold")
        console.print(table)
        if tot["message_weights"]:
            console.print("message weights from the data (x the objective's weight): " + ", ".join(
                f"message {m + 1}: {w:g}" for m, w in sorted(tot["message_weights"].items())))
        if e.truncated:
            console.print(f"[yellow]truncated from {e.n_tokens_full} tokens[/yellow]")


_COLORS = {"template": "#888", "system": "#a0a", "user": "#077", "assistant": "#070", "eos": "#c00"}


def to_html(examples: Sequence[Encoded], tokenizer, objective: str) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>imtune inspect</title><style>",
             "body{font-family:sans-serif;max-width:70em;margin:2em auto}pre{white-space:pre-wrap;"
             "font-family:monospace;line-height:1.6}span.t{border-bottom:3px solid transparent}"
             "span.w{border-bottom-color:currentColor;font-weight:bold}span.z{opacity:.55}"
             "table{border-collapse:collapse}td,th{padding:2px 8px;border:1px solid #ccc}</style>",
             f"<h1>Loss weights · objective <code>{html.escape(objective)}</code></h1><p>"]
    parts += [f"<span style='color:{c}'>■ {s}</span> " for s, c in _COLORS.items()]
    parts.append("— underlined bold tokens carry loss; faded ones do not. Hover a token for its weight.</p>")
    for e in examples:
        parts.append(f"<h2>example {html.escape(str(e.id))}</h2><pre>")
        for r in token_rows(e, tokenizer):
            cls = "t w" if r["weight"] > 0 else "t z"
            parts.append(f"<span class='{cls}' style='color:{_COLORS[r['segment']]}' "
                         f"title='{r['segment']} · weight {r['weight']:g}{_mw(r)} · id {r['id']}'>"
                         f"{html.escape(r['text'])}</span>")
        parts.append("</pre><table><tr><th>segment</th><th>tokens</th><th>weighted</th><th>Σ weight</th></tr>")
        tot = example_totals(e)
        for seg, d in tot["by_segment"].items():
            parts.append(f"<tr><td>{seg}</td><td>{d['tokens']}</td><td>{d['weighted_tokens']}</td>"
                         f"<td>{d['weight']:g}</td></tr>")
        parts.append(f"<tr><th>total</th><th>{tot['tokens']}</th><th>{tot['weighted_tokens']}</th>"
                     f"<th>{tot['total_weight']:g}</th></tr></table>")
    return "".join(parts)


def _mw(row: dict) -> str:
    return f" (message weight {row['message_weight']:g})" if row.get("message_weight", 1.0) != 1.0 else ""
