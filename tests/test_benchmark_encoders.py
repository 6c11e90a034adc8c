"""The encoder benchmark tool: its JSON schema, its parity column, and its errors."""

from __future__ import annotations

import json

import pytest

from benchmarks import encoders

ROW_KEYS = {"model", "batch", "max_abs_diff", "flax_items_per_s", "torch_items_per_s", "speedup", "dtype"}


@pytest.mark.parametrize("which", ["clip", "bert"])
def test_hf_dir_run_writes_rows(which, random_clip_dir, random_bert_dir, tmp_path, capsys):
    directory = (random_clip_dir if which == "clip" else random_bert_dir)[1]
    out = tmp_path / "r.json"
    code = encoders.main(["--hf-dir", str(directory), "--batches", "1,3", "--iters", "1", "--seq-len", "8",
                          "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu")
    expected_outputs = 3 if which == "clip" else 2  # clip: image, text, logits; bert: hidden, sentence
    assert [r["batch"] for r in result["rows"]] == [1] * expected_outputs + [3] * expected_outputs
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        assert row["max_abs_diff"] <= 1e-4  # the PyTorch model ran on the same weights and inputs
        assert row["speedup"] == pytest.approx(row["flax_items_per_s"] / row["torch_items_per_s"])
    assert "max_abs_diff" in capsys.readouterr().out  # the table is printed


def test_missing_hf_dir_exits_nonzero_without_output(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert encoders.main(["--hf-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args", [["--batches", "0,8"], ["--batches", "a"], ["--iters", "0"],
                                  ["--out", "/nonexistent-dir/r.json"]])
def test_bad_arguments_exit_with_usage_error(args):
    with pytest.raises(SystemExit) as exc:
        encoders.main(args)
    assert exc.value.code == 2
