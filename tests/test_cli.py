"""The command line and the operator demo, end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instseg.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_demo_writes_outputs_and_refines_the_box(tmp_path, capsys):
    assert main(["demo", "--work-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    refine = summary["prroi_box_refinement"]
    # Gradient descent on the box coordinates through prroi_pool2d must recover the template.
    assert refine["iou_before"] < 0.7
    assert refine["iou_after"] > 0.99
    assert refine["loss_last"] < refine["loss_first"] / 100
    # One detection per object survives NMS, and its pasted mask matches the object.
    assert summary["nms"]["kept"] == 2
    assert min(summary["pasted_mask_iou"]) > 0.85
    png = (tmp_path / "overlay.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not list(tmp_path.glob("*.tmp"))
    assert "overlay.png" in capsys.readouterr().out


def test_every_command_has_help():
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["demo", "--help"])
    assert exit_info.value.code == 0


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "instseg.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_benchmark_script_runs_quick(tmp_path):
    out = tmp_path / "ops.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "ops.py"),
            "--quick",
            "--repeat",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    cases = {row["case"] for row in rows}
    assert any(c.startswith("roi_align 7x7 s0") for c in cases)
    assert any(c.startswith("prroi_pool2d 7x7") for c in cases)
    assert all(row["ours_ms"] > 0 for row in rows)
