"""`benchmarks/trainer_e2e.py`'s bookkeeping, without running any trainer: what it reads from
metrics.jsonl, and that its RESULTS.md section survives reruns of itself and of `python -m benchmarks`."""

import json

from benchmarks import report
from benchmarks.trainer_e2e import PLANS, SECTION_BEGIN, SECTION_END, Measured, read_metrics, section, write_results


def _record(step, time, samples_total, peak=4e9):
    return {"step": step, "time": time, "unclip_samples_total": samples_total, "unclip_data_wait_ratio": 0.1,
            "unclip_memory_peak_bytes": peak, "unclip_world_size": 2}


def test_read_metrics_skips_warmup_and_reads_the_wall_clock(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # step 1 is slow (warm-up, 64 s); steps 2-3: 128 samples (2 ranks x 32 x 2 steps) in 8 s
    lines = [_record(1, 1064.0, 64), _record(2, 1066.0, 128), _record(3, 1072.0, 192)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    m = read_metrics(path, warmup=1)
    assert abs(m.samples_per_s - 16.0) < 1e-9
    assert m.step_s == 4.0
    assert m.peak_rss_bytes == 2e9  # the reducer's sum over 2 ranks, back to one rank's
    assert abs(m.data_wait_ratio - 0.1) < 1e-9


def _results():
    side = lambda rate, mem: Measured(rate, mem, 1.0, 0.05, "2 processes")  # noqa: E731
    return {"prior": {"ours": side(15.0, 1e9), "theirs": side(10.0, 2e9), "bare": side(16.0, 1e9)}}


def test_section_is_replaced_in_place_and_kept_by_the_models_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("| benchmark | command | results | headline |\n|---|---|---|---|\n"
                   "| models vs dalle2-pytorch, MFU | x | y | z |\n\n## Models\n")
    lines = section(_results(), PLANS["quick"], "python -m benchmarks.trainer_e2e --quick", 10.0, (1.0, 1.0))
    for _ in range(2):  # a rerun replaces its section and its index row, never duplicates them
        write_results(lines, "headline", "python -m benchmarks.trainer_e2e --quick", out)
    text = out.read_text()
    assert text.count(SECTION_BEGIN) == 1 and text.count("| trainers end to end") == 1
    row = next(line for line in text.splitlines() if line.startswith("| prior ("))
    assert "**1.50x** (met)" in row and "**0.50** (met)" in row and "**+7%** (met)" in row
    kept = "\n".join(report.kept_sections(text))
    assert kept.strip().startswith(SECTION_BEGIN) and kept.strip().endswith(SECTION_END)
    assert "## End to end: the trainers" in kept


def test_the_lite_decoder_differs_from_the_matched_one_only_in_its_attention(tmp_path):
    from benchmarks.trainer_e2e import LITE_ATTENTION, _spec, our_job

    matched, lite = _spec("decoder"), _spec("decoder-lite")
    assert lite.attention_resolutions == LITE_ATTENTION != matched.attention_resolutions
    assert {k: v for k, v in vars(lite).items() if k != "attention_resolutions"} == \
        {k: v for k, v in vars(matched).items() if k != "attention_resolutions"}
    job = our_job("decoder-lite", lite, PLANS["quick"], "shards-{0..1}.tar", tmp_path)
    assert job["stage"] == "decoder" and list(job["model"]["unet"]["attention_resolutions"]) == list(LITE_ATTENTION)


def test_each_rounds_ratios_are_listed():
    from benchmarks.trainer_e2e import round_ratios

    side = lambda rate: Measured(rate, 1e9, 1.0)  # noqa: E731
    runs = {"ours": [side(9.0), side(10.0)], "theirs": [side(6.0), side(8.0)], "bare": [side(10.8), side(10.0)]}
    assert round_ratios(runs) == ["1.50x, +20%", "1.25x, +0%"]
    lines = section(_results(), PLANS["quick"], "cmd", 10.0, (1.0, 1.0), rounds=2, per_round={"prior": round_ratios(runs)})
    assert "prior 1.50x, +20% | 1.25x, +0%." in "\n".join(lines)
