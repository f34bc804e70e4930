"""`python -m bit_pytorch.train`: fine-tune a released BiT model with BiT-HyperRule in PyTorch.

The flags, the run's set-up, the schedule, evaluation and checkpoint cadence, resume, signals and
logging are bit_common's shared loop (`bit_common.loop.main`); `bit_pytorch.backend` trains.
PyTorch is imported only once the flags are checked and `runtime.configure` has run.

Multi-GPU / multi-node: launch with `torchrun --nproc_per_node N -m bit_pytorch.train ...`. Each
process trains on its contiguous slice of the global `--batch` under DistributedDataParallel
(nccl on GPU, gloo on CPU); rank 0 writes the logs and checkpoints.
"""

import sys

from bit_common import loop

FRAMEWORK = loop.PackageFramework("pytorch", backend_class="PyTorchBackend")


def main(argv: list[str] | None = None) -> int:
    return loop.main(FRAMEWORK, argv)


if __name__ == "__main__":
    sys.exit(main())
