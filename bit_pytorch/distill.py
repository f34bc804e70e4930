"""`python -m bit_pytorch.distill`: distil a BiT teacher into a student (bit_common.distill) in
PyTorch.

The flags, the augmentation plan, the schedule, evaluation, checkpoints, resume, signals and
logging are bit_common's (`bit_common.distill` through `bit_common.loop`);
`bit_pytorch.distiller.Distiller` trains.
"""

import sys

from bit_common import distill
from bit_pytorch.train import FRAMEWORK


def main(argv: list[str] | None = None) -> int:
    return distill.main(FRAMEWORK, argv)


if __name__ == "__main__":
    sys.exit(main())
