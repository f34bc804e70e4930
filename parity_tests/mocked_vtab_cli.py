"""`python -m bit_<framework>.train` on tfds' mock data, for the VTAB-1k CLI parity test.

    python -m parity_tests.mocked_vtab_cli <framework> <mock examples> <first batch .npz> <flags>

runs the framework's CLI (`bit_<framework>.train.main`) unchanged, except that the tfds reads
of `bit_common.tfds_source.load_vtab_splits` happen inside `tfds.testing.mock_data` (random
examples from each builder's own feature spec, seeded: the same in every process, <mock
examples> in every split), and that the first training batch the backend yields is written to
<first batch .npz> as NHWC float32 `image` and `label` (an empty path: not written).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from bit_common import tfds_source


def batch_arrays(batch: Any) -> dict[str, np.ndarray]:
    """A backend's training batch as numpy: the tf.data pipeline's dict (JAX: its arrays on the
    device), or PyTorch's TrainBatch (NCHW)."""
    if isinstance(batch, dict):
        return {"image": np.asarray(batch["image"]), "label": np.asarray(batch["label"])}
    return {"image": batch.images.permute(0, 2, 3, 1).numpy(), "label": batch.labels.numpy()}


def main(argv: list[str]) -> int:
    framework, examples, first_batch, flags = argv[0], int(argv[1]), argv[2], argv[3:]
    load = tfds_source.load_vtab_splits

    def mocked_load(task, datadir):
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=examples,
                                    policy=tfds.testing.MockPolicy.USE_CODE):
            return load(task, datadir)

    tfds_source.load_vtab_splits = mocked_load
    train = importlib.import_module(f"bit_{framework}.train")
    make_backend = train.FRAMEWORK.make_backend

    def recording_backend(setup):
        backend = make_backend(setup)
        batches = backend.train_batches

        def train_batches(start_step: int) -> Iterator[tuple[int, Any]]:
            it = batches(start_step)
            step, batch = next(it)
            if first_batch:
                np.savez(first_batch, step=step, **batch_arrays(batch))
            yield step, batch
            yield from it

        backend.train_batches = train_batches
        return backend

    train.FRAMEWORK.make_backend = recording_backend
    return train.main(flags)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
