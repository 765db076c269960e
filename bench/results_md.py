"""What every benchmark script shares: the machine line and replacing one section of bench/RESULTS.md in place."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """CPU model, its native bf16 instructions (they decide `precision: auto`) and the cores this process sees."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"Model name:\s*(.+)", out).group(1).strip()
        flags = re.search(r"Flags:\s*(.+)", out).group(1).split()
        bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    except (OSError, subprocess.SubprocessError, AttributeError):
        model, bf16 = "unknown CPU", []
    return f"{model} ({', '.join(bf16) or 'no native bf16'}), {os.cpu_count()} cores visible"


def write_section(section: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section headed `section` (up to the next `## `) with `text`, or append it; other sections stay
    as they are. Written to a temporary name and renamed, so a crash never leaves half a file."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    new = re.sub(rf"(?<=[^\n])\n(?={re.escape(section)})", "\n\n", new)  # a blank line before the heading
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new if new.endswith("\n") else new + "\n")
    tmp.replace(path)
