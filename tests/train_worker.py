"""A training run in its own process: ``python train_worker.py WORKDIR OUT.npz [options]``.

Used by the interruption test (``--kill-at STEP`` ends the process with SIGKILL from inside the
input pipeline, after STEP batches, as a preemption without warning would) and by the
multi-process test (``--process-id I --num-processes N --port P``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--signal", default="SIGKILL", help="SIGKILL (preemption) or SIGTERM (polite)")
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax

    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=args.num_processes, process_id=args.process_id)
    import numpy as np

    from saitjax import parallel, train
    from train_fixtures import tiny_config, tiny_data

    config = tiny_config()
    data = tiny_data(parallel.make_mesh(), config)
    if args.kill_at is not None:
        batches = data.train_batches

        def killing_batches(start_step):
            for step, batch in enumerate(batches(start_step), start=start_step):
                if step == args.kill_at:
                    os.kill(os.getpid(), getattr(signal, args.signal))
                yield batch

        data.train_batches = killing_batches
    result = train.train_and_evaluate(config, args.workdir, data=data)
    if jax.process_index() == 0 and result["eval"]:  # a SIGTERM-stopped run has no final eval
        leaves = jax.tree.leaves(jax.device_get(result["state"].params))
        np.savez(args.out, *leaves, top1=result["eval"]["dense"]["top1"])
    sys.exit(train.exit_status(result))  # as saitjax.main exits


if __name__ == "__main__":
    main()
