"""Training sweeps from a config's ``get_sweep(hyper)``: expand, check, print or run, collect.

    python -m saitjax.launch --config configs/dynamicvit_demo_sweep.py:init=DENSE.npz \\
        --workdir /tmp/sweep --dry-run      # the commands, one per run, for a cluster/TPU launcher
    python -m saitjax.launch --config ... --workdir /tmp/sweep   # run them here, one after another
    python -m saitjax.launch --workdir /tmp/sweep --results      # the table of what has finished

Each run is the ordinary ``python -m saitjax.main`` command with its own workdir
(``ROOT/<name>``, the name made of the swept values), so a run launched by hand, by a scheduler
or by this module is the same run. Before anything starts, every expanded config is built and
checked (:func:`saitjax.train.check_config`): one bad value fails the whole sweep with the runs
it affects named. Run locally, a sweep that was killed and started again skips the runs that
finished (they hold ``results.json``) and resumes the one that was cut short from its
checkpoint. The results (:mod:`saitjax.run_results`) go to ``ROOT/results.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

from saitjax import hyper, run_results
from saitjax.config import load_config_module

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One point of a sweep: its name, its config argument string and field overrides."""

    name: str
    params: dict[str, Any]      # short name -> value, for tables
    config_arg: str             # the ``key=value,...`` string after ``path:``
    overrides: dict[str, Any]   # config field (dotted) -> value
    workdir: str

    def command(self, config_path: str, python: str = "python") -> list[str]:
        """The ``saitjax.main`` command line of this run."""
        config = f"{config_path}:{self.config_arg}" if self.config_arg else config_path
        return ([python, "-m", "saitjax.main", "--config", config, "--workdir", self.workdir]
                + [f"--config.{field}={_flag_text(value)}" for field, value in self.overrides.items()])


def _flag_text(value: Any) -> str:
    """A value as ``--config.field=`` and ``key=value`` arguments parse it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value) if isinstance(value, str) else repr(value)


def _name_text(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else _flag_text(value)
    return _NAME_UNSAFE.sub("-", os.path.basename(text.rstrip("/")) if "/" in text else text) or "_"


def _split_config(config: str) -> tuple[str, str]:
    path, _, arg = config.partition(":")
    return path, arg


def _parse_arg_items(arg: str) -> dict[str, str]:
    items = {}
    for item in filter(None, arg.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not key=value")
        items[key.strip()] = value.strip()
    return items


def plan(config: str, root: str) -> list[PlannedRun]:
    """Expand ``config`` (``path[:arg]``) by its ``get_sweep(hyper)`` into runs under ``root``."""
    path, base_arg = _split_config(config)
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"config file {path} defines no get_sweep(hyper); add one returning e.g. "
                         "hyper.product([hyper.sweep('config.seed', [0, 1, 2])]), or train it with saitjax.main")
    points = module.get_sweep(hyper)
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"{path}: get_sweep(hyper) must return a non-empty list of dicts (hyper.sweep/product/"
                         f"zipit/chain build one), got {type(points).__name__}")
    keys = list(dict.fromkeys(k for point in points for k in point))
    for key in keys:
        hyper._check_key(key)
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys):  # e.g. arg.lr and config.optim.lr
        short = {k: k.split(".", 1)[1] for k in keys}
    # Names (and table columns) from the keys whose value changes between runs.
    varying = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True, default=str) for p in points}) > 1]
    runs, base_items = [], _parse_arg_items(base_arg)
    for point in points:
        args = dict(base_items)
        for key, value in point.items():
            if key.startswith("arg."):
                text = _flag_text(value)
                if "," in text:
                    raise ValueError(f"sweep value {key}={text!r} holds a comma, which config arguments cannot carry")
                args[key[len("arg."):]] = text
        named = [k for k in point if k in varying] or list(point)
        name = "_".join(f"{short[k]}={_name_text(point[k])}" for k in named) or "run"
        runs.append(PlannedRun(name=name, params={short[k]: point[k] for k in named},
                               config_arg=",".join(f"{k}={v}" for k, v in args.items()),
                               overrides={k[len("config."):]: v for k, v in point.items() if k.startswith("config.")},
                               workdir=os.path.join(root, name)))
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{path}: get_sweep gives the same run twice: {repeated}")
    return runs


def build_config(config_path: str, run: PlannedRun) -> Any:
    """The locked ConfigDict of ``run``: ``get_config(arg)`` with the overrides set and validated."""
    config = load_config_module(config_path).get_config(run.config_arg or None)
    config.unlock()
    for field, value in run.overrides.items():
        target, *parts = [config, *field.split(".")]
        for part in parts[:-1]:
            if part not in target:
                raise ValueError(f"config has no field {field!r}")
            target = target[part]
        if parts[-1] not in target:
            raise ValueError(f"config has no field {field!r}")
        target[parts[-1]] = tuple(value) if isinstance(value, list) else value  # type-checked by ConfigDict
    config.lock()
    return config


def check(config_path: str, runs: Sequence[PlannedRun]) -> None:
    """Build and check every run's config; one error naming each bad run, before any starts.

    Nothing here touches a device: the launcher must not take the accelerator (JAX would reserve
    most of a GPU's memory) from the runs it starts. Batch sizes against the device count are
    checked by each run when it starts, before it writes anything."""
    from saitjax import train

    problems = []
    for run in runs:
        try:
            train.check_config(build_config(config_path, run))
        except (ValueError, TypeError, KeyError, AttributeError, FileNotFoundError) as err:
            message = " ".join(str(err).split())
            problems.append(f"  {run.name}: {message}")
    if problems:
        raise ValueError(f"{len(problems)} of the {len(runs)} runs of this sweep have a bad config; nothing "
                         "was started:\n" + "\n".join(problems))


def write_plan(root: str, config: str, runs: Sequence[PlannedRun]) -> str:
    """``ROOT/sweep_plan.json``: the runs (for ``--results`` and for a later re-run)."""
    path = os.path.join(root, run_results.PLAN_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f).get("config")
        if earlier != config:
            raise ValueError(f"{root} holds a sweep of --config {earlier}, not {config}; give this sweep "
                             "another --workdir (runs of two sweeps are never mixed in one table)")
    os.makedirs(root, exist_ok=True)
    payload = {"config": config, "runs": [{"name": r.name, "params": r.params, "workdir": r.workdir,
                                           "command": r.command(_split_config(config)[0])} for r in runs]}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def run_locally(config: str, runs: Sequence[PlannedRun], *, python: str = sys.executable) -> dict[str, str]:
    """Run the runs one after another (each in its own process, as a launcher would); finished
    runs are skipped, an interrupted one resumes. Returns name -> "skipped"/"finished"/"failed (exit N)"."""
    status = {}
    for i, run in enumerate(runs, 1):
        if run_results.read_record(run.workdir) is not None:
            print(f"[{i}/{len(runs)}] {run.name}: finished earlier, skipped", flush=True)
            status[run.name] = "skipped"
            continue
        command = run.command(_split_config(config)[0], python)
        print(f"[{i}/{len(runs)}] {run.name}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command)
        if code != 0:
            status[run.name] = f"failed (exit {code})"
            print(f"[{i}/{len(runs)}] {run.name}: failed with exit status {code}", file=sys.stderr, flush=True)
            if code in (130, 143):  # interrupted (Ctrl-C / SIGTERM): stop the sweep as well
                break
        else:
            status[run.name] = "finished"
            print(f"[{i}/{len(runs)}] {run.name}: finished in {time.perf_counter() - start:.0f} s", flush=True)
    return status


def report(root: str) -> dict[str, str]:
    """Collect the runs of ``root``'s plan into ``results.{md,json,png}``; a seed axis is folded
    into mean ± sd (each run is still listed)."""
    path = os.path.join(root, run_results.PLAN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no sweep in {root} (no {run_results.PLAN_FILE}): start one with "
                                f"`python -m saitjax.launch --config FILE --workdir {root}`")
    with open(path, encoding="utf-8") as f:
        plan_ = json.load(f)
    params = list(dict.fromkeys(k for r in plan_["runs"] for k in r["params"]))
    rows = run_results.collect(root, plan_["runs"])
    fold = "seed" if "seed" in params else None
    config_file = os.path.basename(_split_config(plan_["config"])[0])
    return run_results.write_report(root, rows, params, fold=fold, title=f"training sweep of {config_file}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saitjax.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file with get_sweep(hyper), as path[:arg]")
    parser.add_argument("--workdir", required=True, help="root directory; each run gets ROOT/<name>")
    parser.add_argument("--dry-run", action="store_true", help="check every run, print the commands, run nothing")
    parser.add_argument("--results", action="store_true", help="only collect the table of the runs in --workdir")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the local runs and printed commands")
    args = parser.parse_args(argv)
    try:
        if not args.workdir.strip():
            raise ValueError("--workdir is empty")
        root = os.path.abspath(args.workdir)
        if args.results:
            paths = report(root)
            print(open(paths["md"], encoding="utf-8").read())
            return 0
        if not args.config:
            raise ValueError("--config is required (a config file with get_sweep), unless --results")
        runs = plan(args.config, root)
        check(_split_config(args.config)[0], runs)
        if args.dry_run:
            for run in runs:
                print(shlex.join(run.command(_split_config(args.config)[0], "python")))
            return 0
        write_plan(root, args.config, runs)
        status = run_locally(args.config, runs, python=args.python)
        paths = report(root)
        print(open(paths["md"], encoding="utf-8").read())
        failed = {name: s for name, s in status.items() if s.startswith("failed")}
        if failed or len(status) < len(runs):
            print(f"error: {len(runs) - sum(s in ('finished', 'skipped') for s in status.values())} of "
                  f"{len(runs)} runs did not finish ({failed}); run the same command to complete them",
                  file=sys.stderr)
            return 1
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
