"""docs/INTEGRATIONS.md: its TRL and HF Trainer examples run as written, on the tiny model and a small data file;
only the two lines marked `# <- your model` and `# <- your data` are replaced."""

import math
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "INTEGRATIONS.md"


def examples() -> dict[str, str]:
    """Each runnable example (a python block with a marked model line), by the heading it sits under."""
    out, heading = {}, None
    for part in re.split(r"(^## [^\n]*$|```python\n.*?```)", DOC.read_text(), flags=re.M | re.S):
        if part.startswith("## "):
            heading = part[3:].strip()
        elif part.startswith("```python") and "# <- your model" in part:
            out[heading] = part[len("```python\n"):-3]
    return out


def substituted(code: str, model: Path, data: Path) -> str:
    lines = code.splitlines()
    marked = [i for i, x in enumerate(lines) if "# <- your model" in x or "# <- your data" in x]
    assert [lines[i].split("=")[0].strip() for i in marked] == ["MODEL", "DATA"]
    lines[marked[0]], lines[marked[1]] = f"MODEL = {str(model)!r}", f"DATA = {str(data)!r}"
    return "\n".join(lines)


def test_the_doc_has_a_trl_and_an_hf_trainer_example_of_about_15_lines():
    ex = examples()
    assert set(ex) == {"TRL", "HF Trainer"}
    for code in ex.values():
        assert len([x for x in code.splitlines() if x.strip()]) <= 16


@pytest.mark.parametrize("name", ["TRL", "HF Trainer"])
def test_doc_example_runs_as_written(name, tiny_dir, tmp_path, monkeypatch, one_torch_thread):
    from tests.test_hf_integration import write_data

    data = write_data(tmp_path / "data.jsonl", n=12)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__main__"}
    exec(compile(substituted(examples()[name], tiny_dir, data), f"{DOC}:{name}", "exec"), scope)
    trainer = scope["trainer"]
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert trainer.state.global_step == 2 and rows and all(math.isfinite(r["loss"]) for r in rows)
    assert Path(trainer.args.output_dir).is_dir()
