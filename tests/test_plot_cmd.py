import json
import subprocess
import sys

from imtune.cli.main import main


def test_plot_command_overlays_loss_files(tmp_path, capsys):
    files = []
    for name, base in (("it_train", 1.0), ("im_train", 1.4)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"id": str(i), "tokens": 5, "loss": base + 0.01 * i}) + "\n"
                             for i in range(30)))
        files.append(str(p))
    assert main(["plot", *files, "--labels", "IT train,IM train", "--out", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "IT train: n=30 mean=1.1450" in out
    assert (tmp_path / "fig.png").stat().st_size > 1000 and (tmp_path / "fig.svg").exists()


def test_plot_command_bad_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"loss": 1.0}) + "\n" + json.dumps({"loss": "x"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "imtune.cli.main", "plot", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:2: field 'loss' not a number (str)" in r.stderr
