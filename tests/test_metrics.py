"""MetricWriter (jsonl + TensorBoard through tensorboardX), read_metrics and Progress."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from saitjax.metrics import MetricWriter, Progress, format_duration, format_value, read_metrics


def test_jsonl_round_trip_and_nonfinite(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write_scalars(1, {"loss": 2.5, "lr": np.float32(3e-4), "n": 7}, prefix="train/")
        writer.write_scalars(2, {"loss": float("nan"), "grad": float("inf"),
                                 "neg": -float("inf")}, prefix="train/")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    raw = [json.loads(line) for line in lines]  # Strict JSON: no bare NaN / Infinity.
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert raw[1]["train/loss"] == "nan" and raw[1]["train/grad"] == "inf"
    assert raw[1]["train/neg"] == "-inf"

    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["train/loss"] == 2.5 and records[0]["train/n"] == 7.0
    assert records[0]["train/lr"] == pytest.approx(3e-4)
    assert isinstance(records[0]["time"], float)
    assert math.isnan(records[1]["train/loss"]) and records[1]["train/grad"] == math.inf
    assert records[1]["train/neg"] == -math.inf
    undecoded = read_metrics(str(tmp_path / "metrics.jsonl"), decode_nonfinite=False)
    assert undecoded[1]["train/loss"] == "nan"


def test_lines_are_on_disk_before_close(tmp_path):
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    writer.write_scalars(5, {"top1": 0.5}, prefix="eval/")
    # Not closed, not flushed explicitly: a killed process would still have left this line.
    assert read_metrics(str(tmp_path)) == [
        {"step": 5, "time": read_metrics(str(tmp_path))[0]["time"], "eval/top1": 0.5}]
    writer.close()


def test_resume_appends_and_tolerates_truncated_line(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # A run killed in the middle of a write.
    assert [r["step"] for r in read_metrics(str(path))] == [1]
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write_scalars(3, {"loss": 0.5})
    records = read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (3, 0.5)]


def test_resume_drops_replayed_rows_in_jsonl_and_tensorboard(tmp_path):
    """Killed after step 4 with its last checkpoint at step 2: the resumed run writes steps 3 and
    4 again, and each step is then recorded once, in metrics.jsonl and as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricWriter(str(tmp_path)) as writer:
        for step in (1, 2, 3, 4):
            writer.write_scalars(step, {"loss": float(step)}, prefix="train/")
        writer.write_scalars(2, {"top1": 0.5}, prefix="eval/")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    with MetricWriter(str(tmp_path), resume_step=2) as writer:
        for step in (3, 4):
            writer.write_scalars(step, {"loss": 10.0 + step}, prefix="train/")
    rows = [(r["step"], r.get("train/loss", r.get("eval/top1"))) for r in read_metrics(str(tmp_path))]
    assert rows == [(1, 1.0), (2, 2.0), (2, 0.5), (3, 13.0), (4, 14.0)]
    assert open(tmp_path / "metrics.jsonl").read().endswith("\n")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))  # purges at the resumed run's START event
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_non_chief_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricWriter(str(workdir), is_chief=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_text(0, "config", "x: 1")
        writer.flush()
    assert not workdir.exists()
    assert writer.tensorboard_path is None


def test_bad_values_and_closed_writer(tmp_path):
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    with pytest.raises(TypeError, match="loss"):
        writer.write_scalars(1, {"loss": "high"})
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError):
        writer.write_scalars(2, {"loss": 1.0})


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricWriter(str(tmp_path)) as writer:
        writer.write_text(0, "config", "model: deit_small\nlr: 0.001")
        for step in (10, 20, 30):
            writer.write_scalars(step, {"loss": 1.0 / step, "lr": 1e-3}, prefix="train/")
        writer.write_scalars(30, {"top1@dense": 0.75}, prefix="eval/")
        assert os.path.dirname(writer.tensorboard_path) == str(tmp_path / "tensorboard")
    files = os.listdir(tmp_path / "tensorboard")
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0,
                                                                         "tensors": 0})
    acc.Reload()
    # TensorBoard tags follow TensorFlow's name rules (tensorboardX: "@" -> "_"); the jsonl keeps the key
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "eval/top1_dense"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([0.1, 0.05, 1 / 30])
    assert [(e.step, e.value) for e in acc.Scalars("eval/top1_dense")] == [(30, 0.75)]
    (text,) = acc.Tensors("config/text_summary")  # tensorboardX's tag for a text summary
    assert text.step == 0
    assert text.tensor_proto.string_val == [b"model: deit_small\nlr: 0.001"]
    assert acc.SummaryMetadata("config/text_summary").plugin_data.plugin_name == "text"


def test_writer_does_not_import_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from saitjax.metrics import MetricWriter\n"
        f"w = MetricWriter({str(tmp_path)!r})\n"
        "w.write_scalars(1, {'loss': 1.0}); w.write_text(0, 'config', 'x'); w.close()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow'], 'TF imported'\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


class FakeClock:
    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr("saitjax.metrics.time.perf_counter", lambda: self.now)


def test_progress_lines(monkeypatch):
    clock = FakeClock(monkeypatch)
    printed = []
    progress = Progress(1000, 256, start_step=100, print_fn=printed.append)
    clock.now += 14.2
    first = progress.update(110, loss=2.345678, lr=3e-4)
    assert first.startswith("step 110/1000 (11.0%)")
    assert "loss 2.346" in first and "lr 3.0e-04" in first
    assert "(first step incl. compile 14.2s)" in first
    assert "img/s" not in first and "ETA" not in first
    assert progress.compile_s == pytest.approx(14.2)

    clock.now += 5.0  # 10 steps * 256 images in 5 s.
    second = progress.update(120, loss=1.234, lr=3e-4)
    assert second == "step 120/1000 (12.0%)  loss 1.234  lr 3.0e-04  512.0 img/s  ETA 7m20s"
    with progress.paused():  # An evaluation: left out of the rate.
        clock.now += 60.0
    clock.now += 10.0  # Half as fast now; the ETA uses both recent intervals.
    third = progress.update(130)
    assert "256.0 img/s" in third
    assert "ETA 10m53s" in third  # 870 steps at 15 s / 20 steps = 652.5 s.
    assert printed == [first, second, third]
    assert all("\r" not in line and "\n" not in line for line in printed)


def test_progress_without_total_or_printer(monkeypatch):
    clock = FakeClock(monkeypatch)
    progress = Progress(0, 8, print_fn=None)
    clock.now += 1.0
    assert progress.update(1).startswith("step 1  (first step")
    clock.now += 1.0
    assert progress.update(1) == "step 1"  # Same step again: no rate to report.


def test_formatting_helpers():
    assert format_duration(45) == "45s"
    assert format_duration(192) == "3m12s"
    assert format_duration(2 * 3600 + 5 * 60) == "2h05m"
    assert format_duration(27 * 3600) == "1d03h"
    assert format_duration(float("inf")) == "?"
    assert format_value(0) == "0" and format_value(float("nan")) == "nan"
    assert format_value(0.5) == "0.5" and format_value(2e6) == "2.0e+06"


def test_logged_tells_whether_a_step_is_recorded(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write_scalars(8, {"loss": 1.0}, prefix="train/")
        assert writer.logged(8, "train/") and not writer.logged(8, "eval/") and not writer.logged(7)


def test_progress_bar_where_a_person_watches(monkeypatch):
    """live: tqdm draws the bar (step, rate, ETA) with the scalars as its postfix; nothing is printed."""
    clock = FakeClock(monkeypatch)
    printed = []
    progress = Progress(100, 8, start_step=10, print_fn=printed.append, live=True)
    assert progress._bar.n == 10 and progress._bar.total == 100
    clock.now += 3.0
    progress.update(20, loss=1.5)
    clock.now += 1.0
    line = progress.update(30, loss=1.25)
    assert progress._bar.n == 30 and "loss 1.25" in str(progress._bar)
    assert line.startswith("step 30/100") and printed == []
    progress.close()
    progress.close()
    assert Progress(100, 8)._bar is None  # pytest's captured output is not a terminal
