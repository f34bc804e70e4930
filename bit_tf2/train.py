"""`python -m bit_tf2.train`: fine-tune a released BiT model with BiT-HyperRule in TensorFlow 2.

The flags, the run's set-up, the schedule, evaluation and checkpoint cadence, resume, signals and
logging are bit_common's shared loop (`bit_common.loop.main`); `bit_tf2.backend` trains.
TensorFlow is imported only once the flags are checked and `runtime.configure` has run (its
oneDNN setting must precede the import).

All local GPUs (or logical CPUs) train through `tf.distribute.MirroredStrategy`; several hosts
through `MultiWorkerMirroredStrategy`, chosen when TF_CONFIG is set.
"""

import sys

from bit_common import loop

FRAMEWORK = loop.PackageFramework("tf2", backend_class="TF2Backend")


def main(argv: list[str] | None = None) -> int:
    return loop.main(FRAMEWORK, argv)


if __name__ == "__main__":
    sys.exit(main())
