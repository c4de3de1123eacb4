"""trainer.report and `unclip report`: grids, curves, reading metrics.jsonl."""

import json

import numpy as np
import pytest
from PIL import Image

from launch.cli import main
from trainer.report import console_line, moving_average, nice_ticks, plot_run, read_metrics


def _write_jsonl(path, steps, torn=False):
    with open(path, "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "job": "j", "stage": "prior", "unclip_loss": 1.0 / step, "unclip_samples_per_second": 50.0 + step}) + "\n")
        if torn:
            f.write('{"step": 99, "unclip_lo')


def test_read_metrics_keeps_the_last_line_of_a_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_jsonl(path, [10, 20, 30, 20], torn=True)  # resumed at 10: step 20 logged twice
    records = read_metrics(path)
    assert [r["step"] for r in records] == [10, 20, 30]


def test_report_command_draws_the_curves(tmp_path, capsys):
    _write_jsonl(tmp_path / "metrics.jsonl", range(1, 60))
    assert main(["report", str(tmp_path)]) == 0
    image = Image.open(tmp_path / "report.png")
    assert image.size == (1000, 720)
    # the curves are drawn: the plot areas are not blank
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels[80:320, 100:960] != 255).any(axis=-1).sum() > 500
    assert str(tmp_path / "report.png") in capsys.readouterr().out


def test_report_command_exit_codes(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 1
    with pytest.raises(ValueError, match="no logged steps"):
        plot_run(tmp_path)


def test_helpers():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    line = console_line({"job": "j", "stage": "prior", "step": 7, "unclip_loss": 0.25, "unclip_learning_rate": 1e-4,
                         "unclip_samples_per_second": 12.5, "unclip_step_time_seconds": 0.5, "unclip_data_wait_ratio": 0.1,
                         "unclip_memory_used_bytes": 2**30})
    assert line == "[j/prior] step 7 | loss 0.25 | lr 0.0001 | 12.5 samples/s | 500 ms/step (data 10%) | mem 1.00 GiB"
