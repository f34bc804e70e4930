"""`--train`: which parameters a run fine-tunes, by canonical name (`bit_common.checkpoint`).

    all       every parameter (BiT-HyperRule's fine-tuning)
    head      the head alone (`resnet/head/conv2d/{kernel,bias}`): a linear probe
    blockK    resnet/blockK..block4, the final group norm (`resnet/group_norm/{gamma,beta}`)
              and the head; the root and the blocks before K stay frozen

Frozen parameters never move: no gradient, no momentum, no update. Each backend maps the
trained names onto its own parameters through its models.py name table.
"""

from __future__ import annotations

from collections.abc import Iterable

from bit_common.checkpoint import PREFIX

TRAIN_CHOICES = ("all", "head", "block1", "block2", "block3", "block4")
NUM_BLOCKS = 4


def first_trained_block(train: str) -> int:
    """The first trained block (1-4); 5 when no block is (`head`)."""
    if train not in TRAIN_CHOICES:
        raise ValueError(f"--train {train!r} is not one of {TRAIN_CHOICES}")
    if train == "all":
        return 1
    return NUM_BLOCKS + 1 if train == "head" else int(train[len("block"):])


def is_trained(key: str, train: str) -> bool:
    """Whether the canonical parameter `key` is fine-tuned under `--train train`."""
    first = first_trained_block(train)
    part = key[len(PREFIX):].split("/")[0] if key.startswith(PREFIX) else ""
    if part == "root_block":
        return train == "all"  # block1 keeps the stem frozen: that is all it differs by
    if part == "group_norm":  # the final, pre-head norm belongs to the trained top
        return train != "head"
    if part == "head":
        return True
    if part.startswith("block") and part[len("block"):].isdigit():
        return int(part[len("block"):]) >= first
    raise ValueError(f"{key!r} is not a canonical BiT parameter name")


def trained_keys(keys: Iterable[str], train: str) -> list[str]:
    """The trained ones of `keys`, in their order."""
    return [k for k in keys if is_trained(k, train)]


def describe(train: str) -> str:
    """What `--train train` fine-tunes, in words (the run's start-up line)."""
    first = first_trained_block(train)
    if train == "all":
        return "--train all: every layer trained"
    if train == "head":
        return "--train head: only the head trained (a linear probe), the rest frozen"
    blocks = "-".join(dict.fromkeys((f"block{first}", f"block{NUM_BLOCKS}")))
    frozen = ", ".join(["root", *(f"block{b}" for b in range(1, first))])
    return (f"--train {train}: {blocks}, the final group norm and the head trained; {frozen} "
            f"frozen")
