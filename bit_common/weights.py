"""Find a released checkpoint under --bit_pretrained_dir, downloading it only when it is absent.

`python -m bit_common.weights BiT-M-R50x1 --dir weights/` downloads one file by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bit_common.errors import BiTError
from bit_common.registry import BASE_URL, get_model

# Tests and mirrors point this at another server (for example a local copy of the bucket).
BASE_URL_ENV = "BIT_MODELS_URL"
CHUNK = 1 << 20


def model_url(name: str) -> str:
    """The download address of a released model, honouring $BIT_MODELS_URL."""
    base = os.environ.get(BASE_URL_ENV, BASE_URL)
    return base.rstrip("/") + "/" + get_model(name).filename


def local_path(name: str, pretrained_dir: str | os.PathLike) -> Path:
    """Where `<model>.npz` is expected under the pretrained directory."""
    return Path(pretrained_dir) / get_model(name).filename


def _progress(done: int, total: int | None, start: float, out) -> None:
    mb, rate = done / 1e6, done / 1e6 / max(time.monotonic() - start, 1e-6)
    if total:
        bar = "#" * int(30 * done / total)
        out.write(f"\r  [{bar:<30}] {mb:8.1f}/{total / 1e6:.1f} MB {rate:6.1f} MB/s")
    else:
        out.write(f"\r  {mb:8.1f} MB {rate:6.1f} MB/s")
    out.flush()


def download(url: str, dest: Path, out=sys.stderr, timeout: float = 60.0) -> Path:
    """Stream `url` into `dest.part` with a progress bar, then rename it to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = time.monotonic()
    out.write(f"Downloading {url}\n  -> {dest}\n")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            done = 0
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                _progress(done, total, start, out)
        if total is not None and done != total:
            raise OSError(f"connection closed after {done} of {total} bytes")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        part.unlink(missing_ok=True)
        raise BiTError(
            f"Could not download {url} ({getattr(e, 'reason', e)}). This machine may be offline. "
            f"Download the file elsewhere and put it at {dest}, or point --bit_pretrained_dir at "
            f"the folder that holds it.") from None
    out.write("\n")
    os.replace(part, dest)
    return dest


def find_or_download(name: str, pretrained_dir: str | os.PathLike,
                     allow_download: bool = True) -> Path:
    """Path of `<name>.npz` under `pretrained_dir`, downloaded first if it is not there."""
    path = local_path(name, pretrained_dir)
    if path.is_file():
        return path
    if not allow_download:
        raise BiTError(f"{path} does not exist and downloading is disabled. Download "
                       f"{model_url(name)} and put it there.")
    return download(model_url(name), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download a released BiT checkpoint.")
    parser.add_argument("model", help="released name, e.g. BiT-M-R50x1")
    parser.add_argument("--dir", default=".", help="where to put the .npz")
    args = parser.parse_args(argv)
    try:
        print(find_or_download(args.model, args.dir))
    except BiTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

