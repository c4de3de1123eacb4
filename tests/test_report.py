"""trainer.report and `unclip report`: curves drawn with matplotlib, reading metrics.jsonl."""

import json

import numpy as np
import pytest
from PIL import Image

from launch.cli import main
from trainer.report import console_line, moving_average, plot_run, read_metrics


def _write_jsonl(path, steps, torn=False, validate_every=0):
    with open(path, "w") as f:
        for step in steps:
            record = {"step": step, "job": "j", "stage": "prior", "unclip_loss": 1.0 / step, "unclip_samples_per_second": 50.0 + step}
            if validate_every and step % validate_every == 0:
                record.update(unclip_validation_loss=1.2 / step, unclip_validation_seconds=0.5,
                              unclip_validation_prior_image_cosine=step / 100, unclip_validation_prior_reference_text_cosine=0.3)
            f.write(json.dumps(record) + "\n")
        if torn:
            f.write('{"step": 99, "unclip_lo')


def test_read_metrics_keeps_the_last_line_of_a_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_jsonl(path, [10, 20, 30, 20], torn=True)  # resumed at 10: step 20 logged twice
    records = read_metrics(path)
    assert [r["step"] for r in records] == [10, 20, 30]


def _coloured(pixels, rgb, tolerance=40):
    """How many pixels are close to `rgb` (matplotlib's tab: colours)."""
    return int((np.abs(pixels.astype(int) - np.array(rgb)).sum(axis=-1) < tolerance).sum())


TAB_BLUE, TAB_ORANGE, TAB_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)


def test_report_command_draws_the_curves(tmp_path, capsys):
    _write_jsonl(tmp_path / "metrics.jsonl", range(1, 60))
    assert main(["report", str(tmp_path)]) == 0
    image = Image.open(tmp_path / "report.png")
    assert image.size == (1000, 620)  # two panels: loss, throughput
    pixels = np.asarray(image.convert("RGB"))
    top, bottom = pixels[: image.height // 2], pixels[image.height // 2 :]
    # the training loss is drawn in the top panel, samples/s in the bottom one; no validation
    assert _coloured(top, TAB_BLUE) > 300 and _coloured(bottom, TAB_GREEN) > 300
    assert _coloured(pixels, TAB_ORANGE) == 0
    assert str(tmp_path / "report.png") in capsys.readouterr().out


def test_report_draws_validation_loss_and_sampled_metrics(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", range(1, 60), validate_every=10)
    image = Image.open(plot_run(tmp_path))
    assert image.size == (1000, 900)  # a third panel for the sampled validation metrics
    pixels = np.asarray(image.convert("RGB"))
    loss_panel = pixels[: image.height // 3]
    assert _coloured(loss_panel, TAB_ORANGE) > 100  # the validation loss beside the training loss


def test_report_command_exit_codes(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 1
    with pytest.raises(ValueError, match="no logged steps"):
        plot_run(tmp_path)


def test_helpers():
    assert moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    line = console_line({"job": "j", "stage": "prior", "step": 7, "unclip_loss": 0.25, "unclip_learning_rate": 1e-4,
                         "unclip_samples_per_second": 12.5, "unclip_step_time_seconds": 0.5, "unclip_data_wait_ratio": 0.1,
                         "unclip_memory_used_bytes": 2**30})
    assert line == "[j/prior] step 7 | loss 0.25 | lr 0.0001 | 12.5 samples/s | 500 ms/step (data 10%) | mem 1.00 GiB"
    line = console_line({"job": "j", "stage": "prior", "step": 8, "unclip_loss": 0.25, "unclip_validation_loss": 0.5})
    assert "| val loss 0.5 |" in line
