"""The memory/throughput benchmark CLI: one row per variant, memory from the compiled executable."""

from __future__ import annotations

import json

import pytest

from saitjax import benchmark_memory

pytestmark = pytest.mark.usefixtures("fast_xla")


def test_rows_per_variant_with_memory_and_ratios(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert benchmark_memory.main(["--model", "vit_test_patch4_32", "--img-sizes", "32", "--batch-size", "2",
                                  "--precision", "bfloat16", "--remat", "none,full", "--runs", "1",
                                  "--json", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    train = [r for r in rows if r["step"] == "train"]
    assert [(r["precision"], r["remat"]) for r in train] == [("bfloat16", "none"), ("bfloat16", "full")]
    assert [r["remat"] for r in rows if r["step"] == "eval"] == ["n/a"]  # no backward pass
    for r in rows:
        assert r["peak_mib"] >= r["temp_mib"] > 0 and r["argument_mib"] > 0 and r["img_per_s"] > 0
    assert train[0]["peak_ratio_vs_first"] == 1.0 and train[0]["speed_ratio_vs_first"] == 1.0
    assert "appended 3 rows" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--precision", "float16"], "--precision 'float16': choose from float32, bfloat16"),
    (["--remat", "dots"], "remat='dots': choose 'none', 'full'"),
    (["--attention", "flash"], "--attention 'flash': choose from auto, fused, explicit"),
])
def test_bad_options_are_one_error_line(args, message, capsys):
    assert benchmark_memory.main(["--model", "vit_test_patch4_32", *args]) == 2
    assert message in capsys.readouterr().err
