"""The train-step benchmark tool: JSON schema, FLOP accounting and MFU arithmetic, errors."""

from __future__ import annotations

import json

import pytest

from benchmarks import train_step

ROW_KEYS = {"model", "devices", "batch", "step_s", "examples_per_s", "model_flops_per_s", "peak_flops_per_s", "mfu"}


@pytest.mark.parametrize("model", sorted(train_step.STEPS))
def test_writes_rows_with_consistent_throughput(tmp_path, capsys, model):
    out = tmp_path / "r.json"
    assert train_step.main(["--models", model, "--batches", "4,8", "--iters", "1", "--peak-n", "512",
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["peak_flops_per_s"]) == {"float32", "bfloat16"}
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [(model, 4), (model, 8)]
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        assert row["examples_per_s"] == pytest.approx(row["batch"] / row["step_s"])
        assert row["mfu"] == pytest.approx(row["model_flops_per_s"] / row["peak_flops_per_s"])
        assert row["peak_flops_per_s"] == result["peak_flops_per_s"]["float32"]
    # Model FLOPs grow with the batch: at least 1.5x from batch 4 to 8 (exactly 2x for the matmuls).
    flops = [r["model_flops_per_s"] * r["step_s"] for r in result["rows"]]
    assert 1.5 < flops[1] / flops[0] < 2.5
    assert "MFU" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--models", "nope"], ["--batches", "0"], ["--out", "/nonexistent-dir/r.json"]])
def test_bad_arguments(args):
    with pytest.raises(SystemExit) as exc:
        train_step.main(args)
    assert exc.value.code == 2
