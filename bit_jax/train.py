"""`python -m bit_jax.train`: fine-tune a released BiT model with BiT-HyperRule in JAX.

The flags, the run's set-up, the schedule, evaluation and checkpoint cadence, resume, signals and
logging are bit_common's shared loop (`bit_common.loop.main`); `bit_jax.backend` trains. JAX and
TensorFlow (tf.data) are imported only once the flags are checked and `runtime.configure` has run.

Several hosts: start one process per host with JAX_COORDINATOR_ADDRESS=host0:1234
JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i (`jax.distributed.initialize`); process 0 writes the logs
and checkpoints.
"""

import sys

from bit_common import loop

FRAMEWORK = loop.PackageFramework("jax", backend_class="JaxBackend")


def main(argv: list[str] | None = None) -> int:
    return loop.main(FRAMEWORK, argv)


if __name__ == "__main__":
    sys.exit(main())
