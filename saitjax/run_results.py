"""A finished run's results (``results.json``), and one table over the runs of a training sweep.

The trainer writes ``results.json`` as the very last thing a run does: top-1 with its standard
error over the n test images, GMACs ideal and executed, and kept tokens at each evaluated
density, the wall time of the whole run (over every resume), and img/s when the run ended with a
density sweep. Its presence means "finished": ``python -m saitjax.launch`` skips such runs.
:func:`collect` reads the runs of a sweep into rows, :func:`summarize_over` folds a seed axis
into mean ± sd, and :func:`write_report` writes ``results.md``, ``results.json`` and
``results.png`` (top-1 vs executed GMACs with error bars and the cost-sorted frontier).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Iterable, Mapping, Sequence

RESULTS_FILE = "results.json"
PLAN_FILE = "sweep_plan.json"


def standard_error(top1: float, count: float) -> float:
    """Binomial standard error of a top-1 measured on ``count`` images: sqrt(p (1 - p) / n)."""
    return math.sqrt(max(top1 * (1.0 - top1), 0.0) / count) if count > 0 else float("nan")


def run_record(evaluated: Mapping[str, Mapping[str, Any]], costs: Mapping[str, Mapping[str, float]], *,
               step: int, model: str, method: str, wall_time_s: float,
               sweep_rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The content of ``results.json``: ``evaluated`` (label -> evaluator result) with the
    ``costs`` of each label (:func:`saitjax.flops.density_cost`), the speed columns of a final
    density sweep's rows of the same label, and the densities only that sweep measured."""
    speeds = {row["density"]: {k: v for k, v in row.items() if k.startswith("img_per_s_bs")} for row in sweep_rows}
    densities = []
    for label, result in evaluated.items():
        densities.append({"density": label, "top1": result["top1"], "count": result["count"],
                          "top1_se": standard_error(result["top1"], result["count"]), "loss": result["loss"],
                          **costs[label], **speeds.get(label, {})})
    for row in sweep_rows:  # densities only the sweep measured
        if row["density"] not in evaluated:
            densities.append({"density": row["density"], "top1": row["top1"], "count": row["count"],
                              "top1_se": standard_error(row["top1"], row["count"]), "loss": row["loss"],
                              **{k: row[k] for k in ("gmacs", "gmacs_executed", "kept_fraction")},
                              **speeds[row["density"]]})
    return {"finished": True, "step": int(step), "model": model, "method": method,
            "wall_time_s": float(wall_time_s), "densities": densities}


def write_record(path: str, record: Mapping[str, Any]) -> None:
    """Write ``record`` to ``path`` (local or remote) in one piece: a reader never sees half a file."""
    from etils import epath

    text = json.dumps(record, indent=2, allow_nan=True)
    target = epath.Path(path)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)


def read_record(workdir: str) -> dict[str, Any] | None:
    """A run's ``results.json``, or None while it has not finished (or the file is unreadable)."""
    from etils import epath

    path = epath.Path(workdir) / RESULTS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("finished") else None


def collect(root: str, runs: Iterable[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per (run, evaluated density) of the sweep in ``root``; runs that have not finished
    get one row with ``status`` "not finished". ``runs``: the plan (default: ``root``'s plan file)."""
    if runs is None:
        path = os.path.join(root, PLAN_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no sweep plan; run `python -m saitjax.launch --config FILE "
                                    f"--workdir {root}` first")
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)["runs"]
    rows = []
    for run in runs:
        params = dict(run["params"])
        record = read_record(run["workdir"])
        if record is None:
            rows.append({"run": run["name"], **params, "status": "not finished"})
            continue
        for density in record["densities"]:
            rows.append({"run": run["name"], **params, "status": "finished", "step": record["step"],
                         "wall_time_s": record["wall_time_s"], **density})
    return rows


def summarize_over(rows: Sequence[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """Fold the ``key`` axis (e.g. the seed) into mean ± sample sd per (other params, density):
    ``top1`` becomes the mean, ``top1_sd`` the spread and ``top1_err`` what plots draw
    (the sd; runs are the noise source here, not test images); ``n`` = runs folded."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("status") != "finished":
            continue
        ident = tuple((k, json.dumps(v)) for k, v in row.items() if not _measured(k) and k not in (key, "run"))
        groups.setdefault(ident, []).append(row)
    out = []
    for members in groups.values():
        merged: dict[str, Any] = {k: v for k, v in members[0].items() if not _measured(k) and k not in (key, "run")}
        merged["run"] = ",".join(str(m["run"]) for m in members)
        merged["n"] = len(members)
        for field in dict.fromkeys(k for m in members for k in m if _measured(k)):
            values = [float(m[field]) for m in members if isinstance(m.get(field), (int, float))]
            if values:
                merged[field] = statistics.fmean(values)
                merged[f"{field}_sd"] = statistics.stdev(values) if len(values) > 1 else float("nan")
        merged["top1_err"] = merged.get("top1_sd", float("nan"))
        out.append(merged)
    return out


_MEASURED = ("top1", "top1_se", "count", "loss", "gmacs", "gmacs_executed", "kept_fraction", "wall_time_s", "step")


def _measured(key: str) -> bool:
    """A figure a run measured (averaged over folded runs), not a parameter that names the row."""
    return key in _MEASURED or key.startswith("img_per_s_bs")


def _speed_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The img/s columns present, by batch size."""
    keys = {k for row in rows for k in row if k.startswith("img_per_s_bs") and not k.endswith("_sd")}
    return sorted(keys, key=lambda k: int(k.rsplit("bs", 1)[1]))


def _cell(row: Mapping[str, Any], field: str, fmt: str, scale: float = 1.0) -> str:
    value = row.get(field)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    text = format(scale * value, fmt)
    sd = row.get(f"{field}_sd")
    if isinstance(sd, (int, float)) and math.isfinite(sd):
        text += " ± " + format(scale * sd, fmt)
    return text


def results_table(rows: Sequence[Mapping[str, Any]], params: Sequence[str]) -> str:
    """Markdown: one line per row, the swept ``params`` first. Single runs show top-1 ± its
    standard error over the test images; folded rows (:func:`summarize_over`) mean ± sd over runs."""
    folded = any("n" in row for row in rows)
    speed = _speed_keys(rows)
    header = ([*params, "density", "top-1 (mean ± sd over runs)" if folded else "top-1 ± SE", "n" if folded else "test images",
               "kept tokens", "GMACs executed", "GMACs ideal"] + [f"img/s bs{k.rsplit('bs', 1)[1]}" for k in speed]
              + ["wall time", "status"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if folded:
            top1, n = _cell(row, "top1", ".2f", 100), str(row.get("n", ""))
        else:
            top1 = "" if "top1" not in row else f"{100 * row['top1']:.2f} ± {100 * row['top1_se']:.2f}"
            n = "" if "count" not in row else f"{row['count']:.0f}"
        kept = "" if "kept_fraction" not in row else f"{100 * row['kept_fraction']:.0f} %"
        cells = ([str(row.get(p, "")) for p in params] + [str(row.get("density", "")), top1, n, kept,
                 _cell(row, "gmacs_executed", ".4f"), _cell(row, "gmacs", ".4f")]
                 + [_cell(row, k, ".0f") for k in speed]
                 + [_cell(row, "wall_time_s", ".0f") + (" s" if "wall_time_s" in row else ""),
                    str(row.get("status", "finished"))])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(root: str, rows: Sequence[Mapping[str, Any]], params: Sequence[str], *,
                 fold: str | None = None, title: str | None = None) -> dict[str, str]:
    """``results.json`` (every row), ``results.md`` (the table; with ``fold``, also the table of
    mean ± sd over that axis) and ``results.png`` under ``root``; returns their paths."""
    from saitjax.viz import plot_pareto

    tables = [results_table(rows, params)]
    shown = list(rows)
    summary = None
    if fold is not None:
        summary = summarize_over(rows, fold)
        kept_params = [p for p in params if p != fold]
        tables.insert(0, f"Mean ± sd over {fold}:\n\n" + results_table(summary, kept_params))
        tables[1] = "Each run:\n\n" + tables[1]
        shown = summary
    paths = {"json": os.path.join(root, "results.json"), "md": os.path.join(root, "results.md"),
             "png": os.path.join(root, "results.png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"params": list(params), "rows": list(rows), "summary": summary}, f, indent=2)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n\n".join(tables) + "\n")
    points = [{**row, "label": _point_label(row, [p for p in params if p != fold])}
              for row in shown if isinstance(row.get("gmacs_executed"), (int, float))]
    if points:
        plot_pareto(points, paths["png"], x="gmacs_executed", y="top1", label="label", reference_line=False,
                    title=title or "training sweep: top-1 vs executed GMACs")
    else:
        paths.pop("png")
    return paths


def _point_label(row: Mapping[str, Any], params: Sequence[str]) -> str:
    return " ".join([f"{p}={row[p]}" for p in params if p in row] + [str(row.get("density", ""))])
