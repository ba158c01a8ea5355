"""Benchmark CLI: rows, JSON output, and errors (speed itself is measured, not tested)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from saitjax import benchmark


def test_cli_writes_one_json_row_per_measurement(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    code = benchmark.main(["--model", "vit_test_patch4_32", "--batch-sizes", "1,4", "--keep", "0.5",
                           "--locations", "1,2,3", "--runs", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    required = {"model", "batch_size", "spec", "img_per_s", "ms_per_batch", "compile_s",
                "gmacs_analytic", "gflops_xla"}
    assert all(required <= set(r) for r in rows)
    dense, sparse = rows[2], rows[3]
    assert dense["spec"] == "dense" and sparse["spec"] == "topk:0.5/0.25/0.125@1/2/3"
    assert sparse["flop_ratio_vs_first"] < 0.6 and dense["img_per_s"] > 0
    assert "speedup" in capsys.readouterr().out


def test_cli_rejects_bad_input(capsys):
    assert benchmark.main(["--model", "vit_test_patch4_32", "--keep", "1.5"]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert benchmark.main(["--model", "no_such_model", "--batch-sizes", "1"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert benchmark.main(["--model", "vit_test_patch4_32", "--batch-sizes", "0"]) == 2


def test_cli_adaptive_density_reports_measured_counts_and_bucket(tmp_path):
    out = tmp_path / "rows.jsonl"
    code = benchmark.main(["--model", "sait_test_patch4_32", "--batch-sizes", "2", "--density", "mass:0.5@1",
                           "--runs", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    dense, sparse = [json.loads(line) for line in out.read_text().splitlines()]
    assert sparse["spec"] == "mass:0.5@1" and "capacity_mean" not in dense
    assert 1 <= sparse["kept_tokens_mean"] <= sparse["capacity_mean"] <= 64
    # the per-image ideal FLOPs never exceed what the chosen buckets executed
    assert sparse["gmacs_analytic"] == sparse["gmacs_ideal"]
    assert sparse["gmacs_ideal"] <= sparse["gmacs_executed"] + 1e-12 < dense["gmacs_analytic"] + 1e-12
    assert benchmark.main(["--model", "vit_test_patch4_32", "--density", "mass:0.5@1"]) == 2


def test_cli_baseline_model_is_the_reference_of_every_ratio(tmp_path, capsys):
    """An architecture-changing method (STViT here) against its dense backbone, in one run."""
    out = tmp_path / "rows.jsonl"
    assert benchmark.main(["--model", "stvit_test_patch4_32", "--baseline", "vit_test_patch4_32",
                           "--density", "semantic:9@1", "--batch-sizes", "2", "--runs", "2", "--warmup", "1",
                           "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["model"], r["spec"]) for r in rows] == [
        ("vit_test_patch4_32", "dense"), ("stvit_test_patch4_32", "dense"), ("stvit_test_patch4_32", "semantic:9@1")]
    assert rows[1]["flop_ratio_vs_first"] == 1.0 and rows[2]["flop_ratio_vs_first"] < 0.6
    assert benchmark.main(["--model", "stvit_test_patch4_32", "--baseline", "vit_demo_patch8_64"]) == 2
    assert "compare models of one input size" in capsys.readouterr().err


def test_cli_precision_runs_every_variant_in_bfloat16(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert benchmark.main(["--model", "vit_test_patch4_32", "--batch-sizes", "2", "--keep", "0.5",
                           "--locations", "1", "--precision", "bfloat16", "--runs", "1", "--warmup", "0",
                           "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["precision"] for r in rows] == ["bfloat16", "bfloat16"]
    model, variables = benchmark._model_and_variables("vit_test_patch4_32", None, 0, "bfloat16")
    assert model.dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
