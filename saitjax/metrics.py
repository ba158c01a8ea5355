"""Where a training run's numbers go: a JSON-lines file, TensorBoard events and the console.

    writer = MetricWriter(workdir, is_chief=jax.process_index() == 0)
    progress = Progress(total_steps, global_batch_size, start_step=start_step)
    ...
    writer.write_scalars(step, {"loss": loss, "lr": lr}, prefix="train/")
    progress.update(step, loss=loss, lr=lr)

``metrics.jsonl`` is the record of truth: one self-contained JSON object per call, flushed at
once, so a killed run loses nothing already written. A resumed run (``resume_step``) first drops
the rows after the checkpoint it resumes from, since it is about to write those steps again, so
the file never holds a step twice; in TensorBoard a ``SessionLog.START`` event at the first
replayed step makes TensorBoard discard the orphaned events of the killed run. Plots
(:mod:`saitjax.viz`) and tests read it back with :func:`read_metrics`.

For a remote workdir (``gs://``; :mod:`saitjax.workdir`) both files are written in a local
staging directory and copied up whole by :meth:`MetricWriter.flush` (the trainer flushes at
every checkpoint) and at close: object stores cannot append.

TensorBoard events go through tensorboardX, which writes TensorBoard's protobufs without
TensorFlow from a background thread (the training loop never waits on the disk); resumes use its
``purge_step``. Events reach the file within ``flush_secs`` (10 s) and all of them at close; the
jsonl file, written synchronously, is the one a killed run never loses a row of.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from typing import Any, Callable, Iterator, Mapping

from saitjax import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# JSON has no NaN/Infinity; these strings stand in for them in metrics.jsonl.
_NONFINITE_TO_STR = {"nan": "nan", "inf": "inf", "-inf": "-inf"}
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_event_file_counter = itertools.count()


def _to_float(key: str, value: Any) -> float:
    try:
        return float(value)  # Python/NumPy scalars and 0-d (JAX) arrays alike.
    except (TypeError, ValueError) as err:
        raise TypeError(f"metric {key!r} is not a scalar number: {value!r}") from err


def _json_value(value: float) -> float | str:
    return value if math.isfinite(value) else _NONFINITE_TO_STR[repr(value)]


class _EventFile:
    """TensorBoard events through tensorboardX (a protobuf writer, no TensorFlow), one file per
    writer. tensorboardX writes from a background thread; :meth:`close` drains its queue."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        # Imported here so that metrics.jsonl works even where tensorboardX is not installed.
        from tensorboardX import SummaryWriter

        os.makedirs(logdir, exist_ok=True)
        # tensorboardX names files by the second and host; the pid and a counter keep two writers
        # of one second (a quick resume, tests) apart. TensorBoard reads every file in name order.
        suffix = f".{os.getpid()}.{next(_event_file_counter)}"
        # purge_step: a SessionLog.START at the resumed step, so that TensorBoard discards the
        # killed run's events from that step on.
        self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=10, filename_suffix=suffix)
        (self.path,) = glob.glob(os.path.join(glob.escape(logdir), f"events.out.tfevents.*{suffix}"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricWriter:
    """Appends scalars to ``workdir/metrics.jsonl`` and TensorBoard events under ``tensorboard/``.

    Only the chief process writes (pass ``is_chief=jax.process_index() == 0``); on the others
    every method is a no-op, so the training loop needs no ``if`` around its logging calls.
    ``resume_step``: the step of the checkpoint a resumed run restarts from; rows after it are
    dropped (they are about to be written again). Usable as a context manager, which closes it.
    """

    def __init__(self, workdir: str, *, is_chief: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.workdir = workdir
        self.is_chief = bool(is_chief)
        self.path = workdir_lib.join(workdir, METRICS_FILE)
        self._stage: str | None = None  # local copy of a remote workdir's files
        self.local_path = self.path
        self._jsonl = None
        self._events: _EventFile | None = None
        self._closed = False
        if not self.is_chief:
            return
        if workdir_lib.is_remote(workdir):
            self._stage = tempfile.mkdtemp(prefix="saitjax_metrics_")
            self.local_path = os.path.join(self._stage, METRICS_FILE)
            from etils import epath

            if epath.Path(self.path).exists():
                epath.Path(self.path).copy(self.local_path)
        else:
            os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
            drop_rows_after(self.local_path, resume_step)
        # A run killed mid-write can leave a final line without its newline; start on a fresh
        # line so that our first record is not glued onto (and lost with) that fragment.
        needs_newline = False
        if os.path.exists(self.local_path) and os.path.getsize(self.local_path) > 0:
            with open(self.local_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._jsonl = open(self.local_path, "a", buffering=1, encoding="utf-8")
        if needs_newline:
            self._jsonl.write("\n")
        if tensorboard:
            self._events = _EventFile(os.path.join(self._stage or workdir, TENSORBOARD_DIR),
                                      purge_step=None if resume_step is None else resume_step + 1)

    @property
    def tensorboard_path(self) -> str | None:
        """The event file this writer appends to (``None`` without TensorBoard or off-chief)."""
        return self._events.path if self._events is not None else None

    def _active(self) -> bool:
        if self._closed:
            raise RuntimeError(f"MetricWriter for {self.workdir!r} is closed")
        return self.is_chief

    def write_scalars(self, step: int, scalars: Mapping[str, float], *, prefix: str = "") -> None:
        """Record ``{prefix + key: value}`` at ``step``; non-finite values are kept, as strings."""
        if not self._active():
            return
        step = int(step)
        values = {prefix + key: _to_float(prefix + key, value) for key, value in scalars.items()}
        record: dict[str, Any] = {"step": step, "time": time.time()}
        record.update((key, _json_value(value)) for key, value in values.items())
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._events is not None and values:
            self._events.scalars(step, values)

    def logged(self, step: int, prefix: str = "") -> bool:
        """Whether a row at ``step`` with a key starting with ``prefix`` is already recorded (a
        finished run started again must not record its final evaluation twice)."""
        if not self._active() or not os.path.exists(self.local_path):
            return False
        self._jsonl.flush()
        return any(r.get("step") == step and any(k.startswith(prefix) for k in r if k not in ("step", "time"))
                   for r in read_metrics(self.local_path))

    def last_value(self, key: str) -> float | None:
        """The latest value recorded for ``key`` (after the rows a resume dropped), or None."""
        if not self._active() or not os.path.exists(self.local_path):
            return None
        self._jsonl.flush()
        values = [r[key] for r in read_metrics(self.local_path) if isinstance(r.get(key), (int, float))]
        return float(values[-1]) if values else None

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Record a text (e.g. the config) for TensorBoard's text tab; not written to the jsonl."""
        if not self._active() or self._events is None:
            return
        self._events.text(int(step), tag, text)

    def flush(self) -> None:
        """Push the jsonl rows written so far to disk (they survive a machine crash, not only a
        kill) and hand TensorBoard's queued events to its writer; for a remote workdir, copy both
        files up (complete at :meth:`close`)."""
        if not self._active():
            return
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        if self._events is not None:
            self._events.flush()
        if self._stage is not None:
            workdir_lib.upload(self.local_path, self.path)
            if self._events is not None:
                name = os.path.basename(self._events.path)
                workdir_lib.upload(self._events.path, workdir_lib.join(self.workdir, TENSORBOARD_DIR, name))

    def close(self) -> None:
        """Flush and close the files; closing twice is harmless, writing afterwards is an error."""
        if self._closed:
            return
        if self.is_chief:
            self.flush()
            self._jsonl.close()
            if self._events is not None:
                self._events.close()
            if self._stage is not None:
                shutil.rmtree(self._stage, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def drop_rows_after(path: str, step: int) -> int:
    """Remove the rows of ``path`` (a local ``metrics.jsonl``) whose step is after ``step``, and
    any unreadable fragment; returns how many went. Replaced atomically, only if needed."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def read_metrics(workdir_or_path: str, *, decode_nonfinite: bool = True) -> list[dict]:
    """Load ``metrics.jsonl`` (from a workdir or the file itself) as a list of records.

    Lines that do not parse, such as a last line cut short by a killed run, are skipped.
    With ``decode_nonfinite`` the strings ``"nan"``, ``"inf"`` and ``"-inf"`` become floats
    again, so callers can do arithmetic on every metric value.
    """
    path = workdir_or_path
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if decode_nonfinite:
                record = {key: _STR_TO_NONFINITE.get(value, value) if isinstance(value, str)
                          else value for key, value in record.items()}
            records.append(record)
    return records


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``, ``1d03h``: short enough for a progress line."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0.0, seconds) + 0.5)  # Half up, not to even.
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_value(value: float) -> str:
    """Four significant digits, or scientific notation for tiny/huge values such as a lr."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return str(value) if value != 0 else "0"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _interactive() -> bool:
    """A terminal, or a notebook that can show tqdm's widget (Colab, Jupyter with ipywidgets)."""
    if sys.stderr.isatty():  # where tqdm draws
        return True
    if "ipykernel" not in sys.modules:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """Training progress: a tqdm bar where a person watches (terminal, notebook), one plain line
    per :meth:`update` where a log file does (no carriage returns, so logs stay readable).

    Throughput is measured from the wall time between updates. The first update after a (re)start
    includes compilation, so it reports that time on its own instead of a misleading img/s.
    Construct it right before the training loop: the first interval starts at construction.
    The ETA uses the rate over the last ``window`` intervals. ``live``: force the bar on or off
    (default: on when printing to an interactive session).
    """

    def __init__(self, total_steps: int, global_batch_size: int, start_step: int = 0,
                 print_fn: Callable[[str], Any] | None = print, *, window: int = 10,
                 live: bool | None = None):
        self.total_steps = int(total_steps)
        self.global_batch_size = int(global_batch_size)
        self.print_fn = print_fn
        self._first = True
        self._last_step = int(start_step)
        self._last_time = time.perf_counter()
        self._recent: deque[tuple[int, float]] = deque(maxlen=max(1, window))
        self.compile_s: float | None = None
        self._bar = None
        if live is None:
            live = print_fn is print and _interactive()
        if live:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps or None, initial=int(start_step), unit="step",
                             dynamic_ncols=True, smoothing=0.1)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside (evaluation, checkpointing) out of img/s and the ETA."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last_time += time.perf_counter() - start

    def update(self, step: int, **scalars: float) -> str:
        """Print and return the progress line for ``step`` with the given scalars."""
        now = time.perf_counter()
        step = int(step)
        steps, seconds = step - self._last_step, now - self._last_time
        parts = [self._step_text(step)]
        parts += [f"{name} {format_value(value)}" for name, value in scalars.items()]
        if self._first:
            self._first = False
            self.compile_s = seconds
            parts.append(f"(first step incl. compile {seconds:.1f}s)")
        elif steps > 0 and seconds > 0:
            self._recent.append((steps, seconds))
            parts.append(f"{steps * self.global_batch_size / seconds:.1f} img/s")
            recent_steps = sum(s for s, _ in self._recent)
            recent_seconds = sum(t for _, t in self._recent)
            eta = max(0, self.total_steps - step) * recent_seconds / recent_steps
            parts.append(f"ETA {format_duration(eta)}")
        self._last_step, self._last_time = step, now
        line = "  ".join(parts)
        if self._bar is not None:  # the bar shows step, %, elapsed and ETA itself
            self._bar.set_postfix_str("  ".join(parts[1:]), refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.print_fn is not None:
            self.print_fn(line)
        return line

    def close(self) -> None:
        """End the bar (a no-op for plain lines); safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _step_text(self, step: int) -> str:
        if self.total_steps <= 0:
            return f"step {step}"
        return f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)"
