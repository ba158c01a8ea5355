"""Run records, folding a seed axis into mean ± sd, the results table, and the frontier of plots."""

import math

import pytest

from saitjax import run_results
from saitjax.viz import frontier


def test_standard_error_is_the_binomial_one():
    assert run_results.standard_error(0.75, 2000) == pytest.approx(math.sqrt(0.75 * 0.25 / 2000))
    assert math.isnan(run_results.standard_error(0.5, 0))


def test_record_joins_the_evaluation_its_costs_and_the_sweep():
    evaluated = {"dense": {"top1": 0.8, "count": 100.0, "loss": 0.5}}
    costs = {"dense": {"gmacs": 1.0, "gmacs_executed": 1.0, "kept_fraction": 1.0}}
    sweep = [{"density": "dense", "top1": 0.8, "count": 100.0, "loss": 0.5, "img_per_s_bs1": 10.0, "gmacs": 1.0,
              "gmacs_executed": 1.0, "kept_fraction": 1.0},
             {"density": "topk:0.5", "top1": 0.7, "count": 100.0, "loss": 0.9, "img_per_s_bs1": 15.0, "gmacs": 0.6,
              "gmacs_executed": 0.6, "kept_fraction": 0.5}]
    record = run_results.run_record(evaluated, costs, step=9, model="m", method="dense", wall_time_s=3.0,
                                    sweep_rows=sweep)
    assert record["finished"] and record["step"] == 9
    dense, sparse = record["densities"]
    assert dense["img_per_s_bs1"] == 10.0 and dense["top1_se"] == pytest.approx(0.04)
    assert (sparse["density"], sparse["gmacs_executed"], sparse["img_per_s_bs1"]) == ("topk:0.5", 0.6, 15.0)


def test_seed_axis_folds_into_mean_and_sample_sd():
    rows = [{"run": f"rho={r}_seed={s}", "rho": r, "seed": s, "density": "dense", "status": "finished",
             "top1": t, "gmacs_executed": 1.0} for r, s, t in
            [(0.5, 0, 0.70), (0.5, 1, 0.74), (0.5, 2, 0.72), (0.7, 0, 0.80)]]
    rows.append({"run": "rho=0.7_seed=1", "rho": 0.7, "seed": 1, "status": "not finished"})
    low, high = run_results.summarize_over(rows, "seed")
    assert (low["rho"], low["n"], low["run"]) == (0.5, 3, "rho=0.5_seed=0,rho=0.5_seed=1,rho=0.5_seed=2")
    assert low["top1"] == pytest.approx(0.72) and low["top1_sd"] == pytest.approx(0.02)
    assert low["top1_err"] == low["top1_sd"] and "seed" not in low
    assert high["n"] == 1 and math.isnan(high["top1_sd"])
    table = run_results.results_table([low, high], ["rho"])
    assert "| 0.5 | dense | 72.00 ± 2.00 | 3 |" in table and "| 0.7 | dense | 80.00 | 1 |" in table


def test_table_marks_unfinished_runs():
    table = run_results.results_table([{"run": "a", "seed": 0, "status": "not finished"},
                                       {"run": "b", "seed": 1, "status": "finished", "density": "dense",
                                        "top1": 0.5, "top1_se": 0.05, "count": 100.0}], ["seed"])
    lines = table.splitlines()
    assert lines[2].endswith("| not finished |") and "| 1 | dense | 50.00 ± 5.00 | 100 |" in lines[3]


def test_frontier_joins_only_points_no_cheaper_point_beats():
    # cost, accuracy: the 0.6-cost point is noise below a cheaper one; it is drawn but not joined
    points = [(1.0, 0.80), (0.6, 0.70), (0.5, 0.75), (0.3, 0.60), (0.8, 0.78)]
    assert frontier(points) == [3, 2, 4, 0]
    assert frontier([(100.0, 0.8), (200.0, 0.7), (150.0, 0.75)], cost_is_lower_better=False) == [1, 2, 0]
