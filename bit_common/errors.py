"""One exception type for every mistake a user can make; the CLIs print it without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BiTError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class CheckpointError(BiTError):
    """A `.npz` file that is missing, unreadable, or does not fit the expected layout."""


class DataError(BiTError):
    """A dataset, few-shot request or image folder that cannot be used."""


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str = "") -> BiTError:
    """Build the 'unknown X' error, suggesting the closest known names."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if not close:  # fall back to a substring match ("R50" -> every R50 model)
        close = [k for k in known if name.lower() in k.lower()][:5]
    msg = f"Unknown {kind} {name!r}."
    if close:
        msg += " Did you mean: " + ", ".join(close) + "?"
    msg += f" There are {len(known)} known {kind}s" + (f"; {hint}" if hint else ".")
    return BiTError(msg)
