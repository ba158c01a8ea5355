"""The trainer: one recipe for every method, from a 2-core laptop to a TPU pod.

Read top to bottom: distributed init -> mesh -> model and method -> data -> optimizer ->
state (restored from the workdir, else initialised from ``config.init``, else from scratch) ->
jitted update step -> loop with progress, metrics, per-density evaluation and checkpoints ->
final evaluation, export and plots.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from saitjax import config as config_lib
from saitjax import parallel
from saitjax import run_results, sharding
from saitjax import workdir as workdir_lib
from saitjax.checkpointing import Checkpointer, TrainState, abstract_like, check_meta_compatible
from saitjax.convert import load_variables, save_variables
from saitjax.data.mixing import mixup_cutmix
from saitjax.evaluate import Evaluator
from saitjax.flops import density_cost
from saitjax.methods import Method, build_method
from saitjax.methods.base import MODEL_STATE
from saitjax.metrics import MetricWriter, Progress
from saitjax.models.core.variables import is_variables, split_variables
from saitjax.optim import OptimizerConfig, make_optimizer, param_groups_summary, scaled_lr
from saitjax.sparsity import SparsityError, SparsitySpec
from saitjax.workdir import WorkdirLock


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the run stopped without saving it."""


# ----------------------------------------------------------------------------------------------
# The jitted update step
# ----------------------------------------------------------------------------------------------


def make_train_step(method: Method, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ml_collections.ConfigDict, num_classes: int) -> Callable:
    """``step(state, batch, teacher_params, spec) -> (state, metrics)``, pure, to be jitted.

    Randomness is ``fold_in(seed, step)``: a resumed run draws exactly what an uninterrupted one
    would. A non-finite loss or gradient leaves params and optimizer state unchanged and is
    flagged in the metrics; the host stops the run at its next check.
    """
    mix = config.mixup
    base_key = jax.random.key(config.seed)

    def step(state: TrainState, batch: dict, teacher_params: Any, spec: SparsitySpec):
        rng = jax.random.fold_in(base_key, state.step)
        mix_rng, model_rng = jax.random.split(rng)
        images, targets = mixup_cutmix(mix_rng, batch["image"], batch["label"], num_classes=num_classes,
                                       mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha,
                                       switch_prob=mix.switch_prob, label_smoothing=mix.label_smoothing,
                                       prob=mix.prob)

        def loss_fn(params):
            # models with BatchNorm statistics also get (and give back) their model state
            stateful = {"model_state": state.model_state} if state.model_state else {}
            return method.loss(params, images, targets, spec=spec, rng=model_rng,
                               teacher_params=teacher_params, **stateful)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics = dict(metrics)
        model_state = metrics.pop(MODEL_STATE, state.model_state)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + 1, params=keep_if_finite(params, state.params),
                               opt_state=keep_if_finite(opt_state, state.opt_state),
                               model_state=keep_if_finite(model_state, state.model_state))
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "finite": finite.astype(jnp.float32)}
        return new_state, metrics

    return step


# ----------------------------------------------------------------------------------------------
# Pieces of the recipe
# ----------------------------------------------------------------------------------------------


def run_meta(config: ml_collections.ConfigDict, model: Any) -> dict[str, Any]:
    """What a checkpoint records about its run (and what a resume must agree with)."""
    from saitjax import __version__

    return {"model": config.model, "method": config.method, "num_classes": model.num_classes,
            "img_size": model.img_size, "saitjax_version": __version__}


def durations(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int, int]:
    """``(total_steps, warmup_steps, steps_per_epoch)`` from steps or epochs."""
    steps_per_epoch = max(1, num_train_examples // config.batch_size)
    total = config.train_steps if config.train_steps is not None else math.ceil(config.train_epochs * steps_per_epoch)
    o = config.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    return total, min(warmup, total), steps_per_epoch


def optimizer_config(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int,
                     steps_per_epoch: int) -> OptimizerConfig:
    o = config.optim
    lr = o.lr if o.lr is not None else scaled_lr(o.lr_per_512, config.batch_size)
    return OptimizerConfig(
        lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=min(o.min_lr, lr),
        weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
        grad_clip_norm=o.grad_clip_norm or None, frozen=tuple(o.frozen),
        lr_multipliers=tuple((r, float(m)) for r, m in o.lr_multipliers),
        frozen_until_step=tuple((r, round(float(e) * steps_per_epoch)) for r, e in o.frozen_until_epoch))


def load_pretrained(params: Any, path: str, config: ml_collections.ConfigDict) -> tuple[Any, list[str]]:
    """Overwrite ``params`` leaves with those of ``path``; returns the names left at their init.

    Parameters absent from the file (a sparse method's new modules) and the classifier head when
    its shape differs (fine-tuning to another label set) keep their fresh initialisation.
    ``params`` may also be variables with BatchNorm statistics (``{"params", "batch_stats"}``):
    the file's statistics replace them likewise.
    """
    loaded = load_variables(path, config.model, strict=False, skip_mismatched=r"^head(_dist)?/",
                            **dict(config.model_kwargs))
    if not is_variables(params):
        loaded = loaded["params"]
    flat = traverse_util.flatten_dict(params)
    new = traverse_util.flatten_dict(loaded)
    fresh = sorted("/".join(k) for k in flat if k not in new)
    flat.update({k: jnp.asarray(v, flat[k].dtype) for k, v in new.items()})
    return traverse_util.unflatten_dict(flat), fresh


def check_densities(model: Any, method: Method, config: ml_collections.ConfigDict) -> None:
    """Refuse, before anything runs, an eval/sweep density the model cannot run (with its reason),
    instead of failing at the first evaluation after hours of training."""
    for field in ("densities", "sweep"):
        texts = tuple(config.eval[field])
        try:
            specs = method.eval_densities(texts)
        except SparsityError as err:
            raise ValueError(f"invalid config: eval.{field}: {err}") from None
        for label, spec in specs:
            try:
                spec.check_depth(model.depth)
                model.check_spec(spec)
            except SparsityError as err:
                raise ValueError(f"invalid config: eval.{field} has {label!r}, which {config.model} cannot "
                                 f"run: {err}") from None


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every check of a config that needs neither its data, nor its workdir, nor a device: fields,
    model, method, densities, input files. A training sweep runs it on each of its runs before
    starting any of them."""
    config_lib.validate(config)
    model = config_lib.build_model(config)
    method = build_method(config, model)
    check_densities(model, method, config)
    _check_input_files(config, resuming=False)


class _StopSignal:
    """SIGTERM (preemption) or SIGINT (Ctrl-C) -> finish the current step, save, stop.

    ``received`` is the signal's name. A second signal gets the previous handler at once (a
    second Ctrl-C interrupts without waiting for the save).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint after this step and stopping (again to "
                        "abort without saving)", self.received)
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> bool:
        self._restore()
        return False


def exit_status(result: dict[str, Any]) -> int:
    """The process exit status for a :func:`train_and_evaluate` result: 0 when the run reached
    its end, 128 + the signal number when a signal stopped it after saving (143 SIGTERM,
    130 SIGINT), so a scheduler tells an interrupted run from a finished one."""
    stopped = result.get("stopped_by")
    return 128 + int(signal.Signals[stopped]) if stopped else 0


def _write_config(workdir: str, config: ml_collections.ConfigDict, start_step: int) -> None:
    from etils import epath

    path = epath.Path(workdir_lib.join(workdir, "config.json"))
    text = json.dumps(config_lib.to_dict(config), indent=2, sort_keys=True)
    if path.exists():
        if path.read_text(encoding="utf-8") == text:
            return
        path = epath.Path(workdir_lib.join(workdir, f"config.resumed_step{start_step}.json"))  # never overwrite
    path.write_text(text, encoding="utf-8")


def _check_input_files(config: ml_collections.ConfigDict, resuming: bool) -> None:
    """A missing ``config.init`` / teacher file is refused before the workdir is touched."""
    from etils import epath

    needed = [("config.init", config.init)] if config.init and not resuming else []
    if config.teacher and config.teacher != "init":
        needed.append(("config.teacher", config.teacher))
    elif config.teacher == "init":
        needed.append(("config.init (the teacher)", config.init))
    for field, path in needed:
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"{field}={path!r}: no such file")


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


class Run:
    """Everything a training or evaluation run builds before its loop (one place, so ``--mode
    eval`` restores exactly what training saved)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, data: Any | None = None,
                 mesh: jax.sharding.Mesh | None = None, *, train: bool = False):
        """``train``: this run will write to the workdir (checkpoints); otherwise it only reads
        it and creates nothing (``--mode eval``)."""
        config_lib.validate(config)
        self.config, self.workdir = config, workdir
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.model = model = config_lib.build_model(config)
        self.method = build_method(config, model)
        self.meta = run_meta(config, model)
        parallel.check_batch_size(config.batch_size, self.mesh)
        parallel.check_batch_size(config.eval.batch_size, self.mesh, "eval.batch_size")
        if data is None:
            from saitjax.data.source import TFDSData

            data = TFDSData(config, self.mesh, patch_size=model.patch_size)
        if data.num_classes != model.num_classes:
            raise ValueError(f"invalid config: the dataset has {data.num_classes} classes but the model "
                             f"has num_classes={model.num_classes}; set model_kwargs.num_classes")
        self.data = data
        self.total_steps, warmup, steps_per_epoch = durations(config, data.num_train_examples)
        self.method.bind_schedule(self.total_steps, steps_per_epoch)
        self.opt_config = optimizer_config(config, self.total_steps, warmup, steps_per_epoch)
        self.replicated = parallel.replicated(self.mesh)
        self.dummy = jnp.zeros((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
        self.params_shape, self.model_state_shape = split_variables(
            jax.eval_shape(lambda: model.init(jax.random.key(0), self.dummy)))
        if self.model_state_shape and not self.method.supports_model_state:
            raise ValueError(f"invalid config: {config.model} keeps {sorted(self.model_state_shape)} (BatchNorm "
                             f"statistics), which method {config.method!r} does not train; use method='supervised'")
        self.tx, self.schedule = make_optimizer(self.opt_config, self.params_shape)
        self.state_sharding = self._state_sharding()
        # One evaluator per run: its jitted step (one compilation per density) is reused by
        # every periodic evaluation instead of being traced and compiled again each time.
        self.evaluator = Evaluator(model, self.method.eval_densities())
        check_densities(model, self.method, config)
        # Only now, with the config and data known good, look at the workdir: read it first, and
        # only a training run, once it owns the workdir, writes to it (an evaluation never does).
        self.ckpt = Checkpointer(workdir_lib.join(workdir, "checkpoints"),
                                 max_to_keep=config.checkpoint.max_to_keep,
                                 async_save=config.checkpoint.async_save, create=False)
        self.lock: WorkdirLock | None = None
        self.train = train
        try:
            self.latest = self.ckpt.latest_step()
            self._check_meta()
            _check_input_files(config, resuming=self.latest is not None)
            if train and self.latest is not None and self.latest > self.total_steps:
                raise ValueError(
                    f"workdir {workdir} already holds a checkpoint at step {self.latest}, past the "
                    f"{self.total_steps} steps this config trains (train_steps / train_epochs); nothing "
                    "was done. Evaluate it with --mode eval, or give more steps to train on.")
            if train:
                if jax.process_index() == 0:
                    self.lock = WorkdirLock(workdir).acquire()  # refused while another run owns it
                    workdir_lib.makedirs(self.ckpt.directory)
                if self.ckpt.reload() != self.latest:  # the previous owner saved since we looked
                    self.latest = self.ckpt.latest_step()
                    self._check_meta()
        except BaseException:
            self.close()
            raise

    def _check_meta(self) -> None:
        """Refuse checkpoints of another model/method (read from the newest readable one)."""
        step, saved = self.ckpt.newest_meta()
        if step is not None:
            check_meta_compatible(saved, self.meta, self.workdir)

    def close(self) -> None:
        """Wait for pending checkpoint writes, then let go of the workdir."""
        self.ckpt.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _state_sharding(self) -> TrainState:
        """Shardings of the train state: params (and their Adam moments) by ``compute`` (replicated,
        or FSDP over the data axis, saitjax/sharding.py); the step and BatchNorm statistics replicated."""
        compute = self.config.compute
        specs = sharding.param_specs(self.params_shape, self.mesh, compute.param_sharding,
                                     compute.sharding_rules, compute.fsdp_min_size)
        self.param_sharding = jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs,
                                           is_leaf=lambda x: isinstance(x, PartitionSpec))
        if compute.param_sharding != "replicated" or compute.sharding_rules:
            logging.info("parameters: %s", sharding.describe(specs))
        shape = jax.eval_shape(self.init_state, self.params_shape, self.model_state_shape)
        return TrainState(step=self.replicated, params=self.param_sharding,
                          opt_state=sharding.like_params(shape.opt_state, self.params_shape, self.param_sharding,
                                                         self.replicated),
                          model_state=jax.tree.map(lambda _: self.replicated, shape.model_state))

    def init_state(self, params: Any, model_state: Any = None) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          model_state=model_state or {})

    def restore_or_init(self) -> TrainState:
        """The workdir's latest checkpoint, else ``config.init`` weights, else a fresh init."""
        config, model = self.config, self.model
        if self.latest is not None:
            abstract = abstract_like(jax.eval_shape(self.init_state, self.params_shape, self.model_state_shape),
                                     self.state_sharding)
            state, _, step = self.ckpt.restore(abstract, self.latest)  # falls back past damaged ones
            if step != self.latest and self.train:  # the damaged ones are in the way of new saves
                if jax.process_index() == 0:
                    for damaged in [s for s in self.ckpt.all_steps() if s > step]:
                        moved = self.ckpt.set_aside(damaged, workdir_lib.join(self.workdir, "checkpoints_unreadable"))
                        logging.warning("moved the unreadable checkpoint of step %d to %s", damaged, moved)
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices("saitjax: damaged checkpoints set aside")
                self.ckpt.reload()
            self.latest = step
            logging.info("resumed from %s at step %d", self.ckpt.directory, step)
            return state
        variable_sharding = {"params": self.param_sharding, **self.state_sharding.model_state}
        variables = jax.jit(lambda k: model.init(k, self.dummy), out_shardings=variable_sharding)(
            jax.random.key(config.seed))
        if config.init:
            variables, fresh = load_pretrained(variables, config.init, config)
            variables = parallel.place(variables, variable_sharding)
            logging.info("initialised from %s; fresh init kept for: %s", config.init, fresh or "nothing")
        return jax.jit(self.init_state, out_shardings=self.state_sharding)(*split_variables(variables))

    def jitted_train_step(self, donate: bool = True) -> Callable:
        """``(state, batch, teacher_params, spec) -> (state, metrics)`` with the mesh's shardings.

        ``spec`` is static: one compilation per distinct sparsity spec, never per batch.
        """
        step = make_train_step(self.method, self.tx, self.schedule, self.config, self.model.num_classes)
        return jax.jit(step, static_argnums=3, donate_argnums=0 if donate else (),
                       in_shardings=(self.state_sharding, parallel.batch_sharded(self.mesh), self.replicated),
                       out_shardings=(self.state_sharding, self.replicated))

    def teacher_params(self) -> Any | None:
        if not self.method.uses_teacher:
            return None
        config = self.config
        source = config.init if config.teacher == "init" else config.teacher
        variables = load_variables(source, config.model, strict=False, **dict(config.model_kwargs))
        return parallel.replicate(variables if self.model_state_shape else variables["params"], self.mesh)

    def evaluate(self, params: Any, step: int, writer: MetricWriter | None = None) -> dict[str, Any]:
        results = self.evaluator(params, self.data.eval_batches())
        if writer is not None:
            writer.write_scalars(step, {f"{key}@{label}": value for label, r in results.items()
                                        for key, value in r.items() if key != "count" and not isinstance(value, list)},
                                prefix="eval/")
        logging.info("eval at step %d: %s", step, "  ".join(
            f"{label}: top1 {r['top1']:.4f}" for label, r in results.items()))
        return results


    def write_results(self, results: dict[str, Any], step: int, wall_time_s: float,
                      sweep_rows: list[dict[str, Any]]) -> None:
        """``workdir/results.json``: the final evaluation with its costs (and the sweep's img/s)."""
        costs = {label: density_cost(self.model, spec, results[label]) for label, spec in self.evaluator.densities}
        record = run_results.run_record(results, costs, step=step, model=self.config.model,
                                        method=self.config.method, wall_time_s=wall_time_s, sweep_rows=sweep_rows)
        run_results.write_record(workdir_lib.join(self.workdir, run_results.RESULTS_FILE), record)

    def sweep(self, params: Any, step: int) -> list[dict[str, Any]]:
        """The density sweep of ``config.eval.sweep`` into ``workdir/sweep_step{step}/``."""
        from saitjax.sweep import run_sweep, sweep_table

        config = self.config
        out_dir = workdir_lib.join(self.workdir, f"sweep_step{step}")
        with workdir_lib.local_dir(out_dir) as local:
            rows = run_sweep(self.model, params, self.data.eval_batches(),
                             self.method.eval_densities(config.eval.sweep), local, mean=config.data.mean,
                             std=config.data.std, timing_batch_sizes=tuple(config.eval.sweep_batch_sizes),
                             title=f"{config.model}: one checkpoint (step {step}), every density",
                             evaluator=self.evaluator)
        logging.info("density sweep written to %s:\n%s", out_dir,
                     sweep_table(rows, tuple(config.eval.sweep_batch_sizes)))
        return rows


def _latest(config: ml_collections.ConfigDict, workdir: str, data: Any | None,
            mesh: jax.sharding.Mesh | None, purpose: str) -> tuple[Run, TrainState]:
    """The run and the restored state of the workdir's latest checkpoint (``--mode eval/sweep``),
    or of ``config.init`` when the workdir has none (off-the-shelf use, e.g. ToMe on DeiT weights)."""
    run = Run(config, workdir, data, mesh)
    if run.latest is None and not config.init:
        run.close()
        raise FileNotFoundError(f"no checkpoint in {run.ckpt.directory} to {purpose} and no config.init; "
                                "train first, or give config.init to evaluate pretrained weights as they are")
    return run, run.restore_or_init()


def sweep_checkpoint(config: ml_collections.ConfigDict, workdir: str, data: Any | None = None,
                     mesh: jax.sharding.Mesh | None = None) -> list[dict[str, Any]]:
    """``--mode sweep``: the density sweep of the workdir's latest checkpoint."""
    if not config.eval.sweep:
        example = "(" + "".join(f'"{d}", ' for d in config.eval.densities) + ")"  # densities this config accepts
        raise ValueError(f"config.eval.sweep is empty: give the densities to sweep, e.g. "
                         f"--config.eval.sweep='{example}'")
    run, state = _latest(config, workdir, data, mesh, "sweep")
    try:
        return run.sweep(state.variables(), run.latest or 0)
    finally:
        run.close()


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, data: Any | None = None,
                        mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """``--mode eval``: evaluate the workdir's latest checkpoint at every configured density."""
    run, state = _latest(config, workdir, data, mesh, "evaluate")
    try:
        return run.evaluate(state.variables(), run.latest or 0)
    finally:
        run.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data: Any | None = None,
                       mesh: jax.sharding.Mesh | None = None,
                       max_steps: int | None = None) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming what is there); returns the final evaluation.

    ``data`` replaces the TFDS input (an object with ``num_train_examples``, ``num_classes``,
    ``train_batches(start_step)`` and ``eval_batches()``, all yielding global batches); tests use
    it. ``max_steps`` stops early (tests of interruption), as a kill would.
    """
    run = Run(config, workdir, data, mesh, train=True)
    try:
        return _train(run, max_steps)
    finally:
        run.close()


def _train(run: Run, max_steps: int | None) -> dict[str, Any]:
    config, workdir = run.config, run.workdir
    method, ckpt, data = run.method, run.ckpt, run.data
    total_steps, meta = run.total_steps, run.meta
    chief = jax.process_index() == 0
    state = run.restore_or_init()
    teacher_params = run.teacher_params()

    start_step = int(jax.device_get(state.step))
    if chief:
        workdir_lib.makedirs(workdir)
        _write_config(workdir, config, start_step)
        logging.info("optimizer param groups:\n%s", param_groups_summary(run.opt_config, run.params_shape))

    step_fn = run.jitted_train_step()
    writer = MetricWriter(workdir, is_chief=chief, resume_step=start_step if start_step > 0 else None)
    # Wall time of the whole run, over every resume: what this session adds to what was logged.
    wall_before, session_start = (writer.last_value("train/wall_time_s") or 0.0), time.perf_counter()

    def wall_time() -> float:
        return wall_before + time.perf_counter() - session_start

    progress = Progress(total_steps, config.batch_size, start_step=start_step)
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)

    def evaluate(step: int, log: bool = True) -> dict[str, Any]:
        with progress.paused():
            return run.evaluate(state.variables(), step, writer if log else None)

    pending: list[tuple[int, Any]] = []  # (step, metrics on device) since the last host check
    last_checked = start_step

    def check_and_log(step: int) -> None:
        nonlocal pending, last_checked
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        bad = [s for (s, _), m in zip(pending, fetched) if m["finite"] < 1]
        if bad:
            raise NonFiniteLossError(
                f"loss or gradient became NaN/inf at step {bad[0]} (checked steps {last_checked + 1}-"
                f"{step}); no checkpoint of that state was written (last checkpoint: step "
                f"{ckpt.latest_step()}). Lower optim.lr, enable optim.grad_clip_norm, or check the data.")
        # Steps at different densities may report different terms (e.g. SaiT's dense warm-up):
        # average each key over the steps that have it.
        keys = sorted({k for m in fetched for k in m} - {"finite"})
        scalars = {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}
        writer.write_scalars(step, {**scalars, "wall_time_s": wall_time()}, prefix="train/")
        progress.update(step, loss=scalars["loss"], lr=fetched[-1]["lr"])
        pending, last_checked = [], step

    try:  # metrics reach a remote workdir on close, also when training fails
        results: dict[str, Any] = {}
        with _StopSignal() as stop:
            batches = data.train_batches(start_step)
            step = start_step
            while step < stop_at:
                batch = next(batches)
                spec = method.train_sparsity(step)
                state, metrics = step_fn(state, batch, teacher_params, spec)
                step += 1
                pending.append((step, metrics))
                if step % config.log_every_steps == 0 or step == stop_at or stop.received:
                    check_and_log(step)
                if step % config.checkpoint.every_steps == 0 or step == total_steps or stop.received:
                    check_and_log(step)  # never save a state whose loss was not checked finite
                    with progress.paused():
                        ckpt.save(step, state, meta)
                        writer.flush()  # a remote workdir gets its metrics copied up here
                if step % config.eval.every_steps == 0 and step != total_steps and not stop.received:
                    results = evaluate(step)
                if stop.received:
                    break
            ckpt.wait()
        if step == total_steps and not stop.received:
            # A finished run started again has its final evaluation recorded already.
            results = evaluate(step, log=not (start_step == total_steps and writer.logged(step, "eval/")))
            variables = parallel.to_host(state.variables())  # every process takes part (sharded params)
            if chief:
                from etils import epath

                export = workdir_lib.join(workdir, "export", f"params_step{step}.npz")
                if not epath.Path(export).exists():
                    with workdir_lib.local_file(export) as local:
                        save_variables(local, variables, model=config.model,
                                       method=config.method, step=step, model_kwargs=dict(config.model_kwargs))
                if config.plot:
                    from saitjax.viz import plot_training_curves

                    with workdir_lib.local_file(workdir_lib.join(workdir, "training_curves.png")) as local:
                        plot_training_curves(writer.local_path, local, title=f"{config.model} ({config.method})")
            sweep_rows = []
            if config.eval.sweep:
                with progress.paused():
                    sweep_rows = run.sweep(state.variables(), step)
            # Last: its presence marks the run finished (a training sweep skips it); a finished
            # run started again keeps the record of the session that trained it.
            if chief and (start_step < total_steps or run_results.read_record(workdir) is None):
                run.write_results(results, step, wall_time(), sweep_rows)
    finally:
        progress.close()
        writer.close()
    if stop.received:
        logging.warning("stopped by %s at step %d, checkpoint saved; run the same command to resume",
                        stop.received, step)
    return {"step": step, "eval": results, "state": state, "stopped_by": stop.received}
