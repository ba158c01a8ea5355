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
import sys

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    del argv
    from saitjax import parallel

    parallel.initialize_distributed(_DISTRIBUTED.value)  # before any other JAX call
    logging.getLogger().setLevel(logging.INFO)
    from saitjax import train
    from saitjax import workdir as workdir_lib
    from saitjax.checkpointing import CheckpointMismatchError

    config = _CONFIG.value
    try:
        workdir = workdir_lib.resolve(_WORKDIR.value)  # a gs:// URI stays a URI
        if _MODE.value == "train":
            workdir_lib.check_writable(workdir)
        if _MODE.value == "eval":
            results = train.evaluate_checkpoint(config, workdir)
        elif _MODE.value == "sweep":
            results = train.sweep_checkpoint(config, workdir)
        else:
            results = train.train_and_evaluate(config, workdir)["eval"]
    except (ValueError, FileNotFoundError, train.NonFiniteLossError, CheckpointMismatchError,
            workdir_lib.WorkdirBusyError) as err:
        logging.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"workdir": workdir, "eval": results}, indent=2))
    return 0


def run() -> None:
    try:
        app.run(main)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # --config.field=value overrides are applied while flags are parsed, before main().
        message = " ".join(str(err).replace("\\n", " ").replace("\\'", "'").split()).replace("'", "").strip('"')
        print(f"error: bad --config override or config argument: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
