"""Command line: train (default) or evaluate a config in a workdir.

    python -m saitjax.main --config configs/demo.py --workdir /tmp/demo
    python -m saitjax.main --config configs/deit_small_imagenet.py:epochs=30 --workdir DIR \
        --config.batch_size=512 --config.data.manual_dir=/data/imagenet
    python -m saitjax.main --config configs/demo.py --workdir /tmp/demo --mode eval
    python -m saitjax.main --config configs/demo.py --workdir /tmp/demo --mode sweep

The same command runs on one machine or on every host of a TPU slice / GPU cluster
(``--distributed``, or auto-detected from SLURM/Open MPI/TPU environment variables).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py:arg",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sweep"],
                          "train (and evaluate), evaluate only, or sweep densities (config.eval.sweep) "
                          "of the latest checkpoint")
_DISTRIBUTED = flags.DEFINE_boolean("distributed", None,
                                    "call jax.distributed.initialize() (default: auto-detect)")
_VERBOSE = flags.DEFINE_boolean("verbose", False, "also show the INFO logs of the libraries underneath "
                                "(orbax's per-save lines, TFDS); saitjax's own progress is always shown")
flags.mark_flags_as_required(["config", "workdir"])


def set_log_levels(verbose: bool) -> None:
    """saitjax's own INFO lines (progress, evaluations, checkpoints) always; those of orbax and TFDS
    (which log through absl's logger: several lines per checkpoint) and JAX's backend probing only
    with --verbose."""
    logging.getLogger().setLevel(logging.INFO)
    for name in ("absl", "jax._src.xla_bridge"):  # the latter: "Unable to initialize backend 'tpu'"
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _fail(message: str) -> int:
    """The one line a user or a scheduler sees for a bad input (no traceback, printed once)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def _config_or_error() -> Any:
    """``--config``'s ConfigDict; a file that is missing or unreadable is a one-line error."""
    try:
        config = _CONFIG.value
        config.keys()  # config_flags defers a failed load to the first use of the config
        return config
    except OSError as err:
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        reason = "no such file" if not os.path.exists(path) else str(err).strip().splitlines()[-1].strip()
        raise _ConfigFileError(f"config file {path}: {reason}") from None


class _ConfigFileError(ValueError):
    pass


def main(argv: list[str]) -> int:
    del argv
    from saitjax import parallel

    parallel.initialize_distributed(_DISTRIBUTED.value)  # before any other JAX call
    set_log_levels(_VERBOSE.value)
    from saitjax import train
    from saitjax import workdir as workdir_lib
    from saitjax.checkpointing import CheckpointCorruptError, CheckpointMismatchError, CheckpointSaveError

    try:
        config = _config_or_error()
        workdir = workdir_lib.resolve(_WORKDIR.value)  # a gs:// URI stays a URI
        if _MODE.value != "eval":  # eval only reads (a missing workdir: "no checkpoint in ...")
            workdir_lib.check_writable(workdir)
        if _MODE.value == "eval":
            results = train.evaluate_checkpoint(config, workdir)
        elif _MODE.value == "sweep":
            results = train.sweep_checkpoint(config, workdir)
        else:
            result = train.train_and_evaluate(config, workdir)
            if result["stopped_by"]:
                print(f"stopped by {result['stopped_by']} at step {result['step']}, after saving a "
                      "checkpoint; run the same command to resume", file=sys.stderr)
                return train.exit_status(result)
            results = result["eval"]
    except KeyboardInterrupt:  # Ctrl-C before the training loop (or a second one): nothing saved
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, train.NonFiniteLossError, CheckpointMismatchError,
            CheckpointCorruptError, CheckpointSaveError, workdir_lib.WorkdirBusyError) as err:
        return _fail(str(err))
    print(json.dumps({"workdir": workdir, "eval": results}, indent=2))
    return 0


def run() -> None:
    try:
        app.run(main)
    except SyntaxError as err:  # raised while --config is parsed, before main()
        sys.exit(_fail(f"config file {err.filename}, line {err.lineno}: {err.msg}"))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # --config.field=value overrides are applied while flags are parsed, before main().
        message = " ".join(str(err).replace("\\n", " ").replace("\\'", "'").split()).replace("'", "").strip('"')
        sys.exit(_fail(f"bad --config override or config argument: {message}"))


if __name__ == "__main__":
    run()
