"""One exception type for every mistake a user can make; the CLIs print it without a traceback."""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable
from typing import Any


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


class PeerLostError(BiTError):
    """Another process of a multi-process run stopped, so this one cannot go on."""

    def __init__(self, detail: str):
        super().__init__(
            f"Another process of this multi-process run stopped ({detail}), so this one stops "
            f"too. The last checkpoint of the run is intact: start every process with the same "
            f"command again to resume.")


def peer_losses(detail: Callable[[Any, Exception], str | None]) -> Callable[[Callable], Callable]:
    """A decorator for a backend's methods that run collectives: an exception in which
    `detail(backend, exception)` recognises a lost peer (and describes it) becomes a
    PeerLostError; any other propagates unchanged."""
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                found = detail(self, e)
                if found is None:
                    raise
                raise PeerLostError(found) from None
        return wrapped
    return decorate


# How Gloo (PyTorch's and JAX's CPU collectives) and NCCL word a collective whose peer is gone.
_COLLECTIVE_PEER_FAILURES = ("closed by peer", "reset by peer", "remote worker", "NCCL")


def collective_peer_failure(e: Exception) -> str | None:
    """The first sentence of a Gloo/NCCL error that says a peer is gone, or None."""
    text = str(e)
    if not any(s in text for s in _COLLECTIVE_PEER_FAILURES):
        return None
    text = re.sub(r"\[[^\]]*/[^\]]*\]\s*", "", text)  # without Gloo's source paths
    return text.strip().splitlines()[0].split(". ")[0][:300]
