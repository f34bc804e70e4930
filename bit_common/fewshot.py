"""Few-shot subsets from the label array alone, identical whichever framework asks."""

from __future__ import annotations

import numpy as np

from bit_common.errors import DataError


def sample_few_shot(labels: np.ndarray, examples_per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of `examples_per_class` random examples of every class, sorted ascending.

    Uses numpy's PCG64 generator only, so the subset depends on (labels, K, seed) and nothing
    else. Linear apart from one stable integer sort: 5-shot over 1.28 M labels takes ~0.1 s.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"Few-shot sampling needs a 1-D integer label array, got shape "
                        f"{labels.shape} of {labels.dtype}.")
    if examples_per_class < 1:
        raise DataError(f"--examples_per_class must be at least 1, got {examples_per_class}.")
    if labels.size and labels.min() < 0:
        raise DataError(f"Labels must be non-negative, found {labels.min()}.")
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    short = present[counts[present] < examples_per_class]
    if short.size:
        c = int(short[0])
        raise DataError(
            f"--examples_per_class {examples_per_class} asks for more examples than class {c} "
            f"has ({counts[c]}); {short.size} class(es) are that small. Use at most "
            f"{int(counts[present].min())} examples per class, or drop the flag for full data.")
    perm = np.random.default_rng(seed).permutation(labels.size)
    by_class = perm[np.argsort(labels[perm], kind="stable")]  # each class's indices, shuffled
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
    take = (starts[:, None] + np.arange(examples_per_class)[None, :]).ravel()
    return np.sort(by_class[take])
