"""bench/scale.py runs end to end at a tiny size (its timings are not asserted: the lead runs it for numbers)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_scale_bench_quick_runs(tiny_dir, tmp_path):
    out = tmp_path / "RESULTS.md"
    p = subprocess.run([sys.executable, str(ROOT / "bench/scale.py"), "--quick", "--model", str(tiny_dir),
                        "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    assert "## Scale (encode cache, cached training)" in text and "| 200 |" in text
    assert "imtune stats" in text and "the paper's masking code (IM)" in text
