"""The released .npz layout, its errors, the name mapping, and downloading weights."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest

from bit_common import checkpoint, weights
from bit_common.errors import BiTError, CheckpointError
from bit_common.registry import ARCHITECTURES, parse_arch

R50 = parse_arch("R50x1")
BODY_MILLIONS = {"R50x1": 23.5, "R101x1": 42.5, "R50x3": 211.2, "R152x2": 232.2,
                 "R101x3": 381.8, "R152x4": 928.3}


def shapes_only(arch, classes):
    """Zero-memory arrays of the released shapes (enough for layout checks of any size)."""
    return {k: np.broadcast_to(np.float32(0), s)
            for k, s in checkpoint.expected_shapes(arch, classes).items()}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_layout_sizes_and_inference(name):
    arch = parse_arch(name)
    shapes = checkpoint.expected_shapes(arch, 21843)
    body = sum(np.prod(s) for k, s in shapes.items() if "/head/" not in k)
    assert body / 1e6 == pytest.approx(BODY_MILLIONS[name], abs=0.05)
    assert checkpoint.infer_arch(shapes_only(arch, 7)) == (arch, 7)


def test_layout_details_of_r50x1():
    s = checkpoint.expected_shapes(R50, 10)
    assert s["resnet/root_block/standardized_conv2d/kernel"] == (7, 7, 3, 64)
    assert s["resnet/block1/unit01/a/group_norm/gamma"] == (64,)
    assert s["resnet/block1/unit01/a/proj/standardized_conv2d/kernel"] == (1, 1, 64, 256)
    assert s["resnet/block2/unit01/b/standardized_conv2d/kernel"] == (3, 3, 128, 128)
    assert s["resnet/block4/unit03/c/standardized_conv2d/kernel"] == (1, 1, 512, 2048)
    assert "resnet/block1/unit02/a/proj/standardized_conv2d/kernel" not in s
    assert s["resnet/head/conv2d/kernel"] == (1, 1, 2048, 10)
    strides = [u[-1] for u in checkpoint.unit_names(R50)]
    assert [i for i, st in enumerate(strides) if st == 2] == [3, 7, 13]


def test_random_checkpoint_round_trip_and_quirk(tmp_path, r50_params):
    path = tmp_path / "q.npz"
    quirky = {k.replace("proj/standardized_conv2d", "proj/standardized_conv2d_1"): v
              for k, v in r50_params.items()}
    np.savez(path, **quirky)
    arch, loaded = checkpoint.load_params(path)
    assert arch == R50 and loaded.keys() == r50_params.keys()
    assert all(np.array_equal(loaded[k], r50_params[k]) for k in loaded)
    again = checkpoint.random_params(R50, 10, seed=0)
    assert all(np.array_equal(again[k], r50_params[k]) for k in again)
    _, fresh = checkpoint.load_params(path, num_classes=3)
    assert fresh["resnet/head/conv2d/kernel"].shape == (1, 1, 2048, 3)
    assert not fresh["resnet/head/conv2d/kernel"].any() and not fresh["resnet/head/conv2d/bias"].any()


def test_layout_errors_name_the_key_and_shapes(tmp_path, r50_params):
    bad = dict(r50_params)
    bad["resnet/block3/unit02/b/standardized_conv2d/kernel"] = np.zeros((3, 3, 256, 255),
                                                                         np.float32)
    with pytest.raises(CheckpointError, match=r"block3/unit02/b/standardized_conv2d/kernel': file "
                                              r"has \(3, 3, 256, 255\), R50x1 needs \(3, 3, 256, 256\)"):
        checkpoint.validate(bad, R50, 10)
    missing = {k: v for k, v in r50_params.items() if "block2/unit03/c" not in k}
    with pytest.raises(CheckpointError, match="3 missing key"):
        checkpoint.validate(missing, R50, 10)
    with pytest.raises(CheckpointError, match="1 unexpected key.*'resnet/extra'"):
        checkpoint.validate({**r50_params, "resnet/extra": np.zeros(1)}, R50, 10)


def test_unreadable_files_are_explained(tmp_path, r50_npz):
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(r50_npz.read_bytes()[:100_000])
    not_npz = tmp_path / "n.npz"
    not_npz.write_text("<html>Not found</html>")
    one_array = tmp_path / "a.npz"
    with open(one_array, "wb") as f:
        np.save(f, np.zeros(3))
    empty = tmp_path / "e.npz"
    empty.write_bytes(b"")
    for path, says in ((truncated, "is a damaged or truncated .npz archive"),
                       (not_npz, "is not an .npz archive (a zip of .npy arrays): it begins with "
                                 "text b'<html>No'"),
                       (one_array, "is a single .npy array"), (empty, "is empty")):
        with pytest.raises(CheckpointError) as e:
            checkpoint.read_npz(path)
        assert says in str(e.value) and "download it again" in str(e.value)
        assert "pickle" not in str(e.value) and "unsafe" not in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read_npz(tmp_path / "absent.npz")
    other = tmp_path / "o.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a BiT ResNet-v2"):
        checkpoint.load_params(other)


def test_save_params_writes_exactly_the_released_layout(tmp_path, r50_params):
    path = tmp_path / "s.npz"
    checkpoint.save_params(r50_params, path)
    with np.load(path) as f:
        assert sorted(f.files) == sorted(checkpoint.expected_shapes(R50, 10))
    assert not list(tmp_path.glob("*.tmp"))


def test_conversion_to_framework_names_and_layout_inverts(r50_params):
    """A framework's name function and layout, and back: the same arrays, validated."""
    upper = {k: k.upper() for k in r50_params}
    fw = checkpoint.to_framework(r50_params, upper.get, lambda a: a.T)
    assert set(fw) == set(upper.values())
    assert fw[upper[checkpoint.ROOT_KERNEL]].shape == (64, 3, 7, 7)
    back = checkpoint.from_framework(fw, R50, 10, upper.get, lambda a: a.T)
    assert all(np.array_equal(back[k], r50_params[k]) for k in r50_params)
    del fw[upper[checkpoint.HEAD_BIAS]]
    with pytest.raises(CheckpointError, match="The model has no parameter 'RESNET/HEAD"):
        checkpoint.from_framework(fw, R50, 10, upper.get, lambda a: a.T)


# ---- weights: find locally, or download over HTTP (a loopback server stands in) ------------
@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "bucket"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_when_absent_then_find_locally(tmp_path, file_server, monkeypatch, r50_npz):
    root, url = file_server
    (root / "BiT-S-R50x1.npz").write_bytes(r50_npz.read_bytes())
    monkeypatch.setenv(weights.BASE_URL_ENV, url)
    dest = tmp_path / "weights"
    path = weights.find_or_download("BiT-S-R50x1", dest)
    assert path == dest / "BiT-S-R50x1.npz" and path.read_bytes() == r50_npz.read_bytes()
    assert not list(dest.glob("*.part"))
    (root / "BiT-S-R50x1.npz").unlink()  # a second call must not need the server
    assert weights.find_or_download("BiT-S-R50x1", dest) == path


def test_failed_download_says_where_to_put_the_file(tmp_path, file_server, monkeypatch):
    _, url = file_server
    monkeypatch.setenv(weights.BASE_URL_ENV, url)
    dest = tmp_path / "weights"
    with pytest.raises(BiTError, match=r"Could not download .*BiT-M-R101x3.npz.*put it at"):
        weights.find_or_download("BiT-M-R101x3", dest)
    assert list(dest.iterdir()) == []  # no .part left behind
    with pytest.raises(BiTError, match="Unknown model"):
        weights.find_or_download("BiT-X-R50x1", dest)


def test_weights_cli(tmp_path, file_server, monkeypatch, capsys):
    root, url = file_server
    monkeypatch.setenv(weights.BASE_URL_ENV, url)
    (root / "vtab").mkdir()
    (root / "vtab" / "BiT-M-R50x1-run0-dtd.npz").write_bytes(b"x" * 3_000_000)
    assert weights.main(["vtab/BiT-M-R50x1-run0-dtd", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "vtab" / "BiT-M-R50x1-run0-dtd.npz").stat().st_size == 3_000_000
    assert weights.main(["BiT-M-R50x1", "--dir", str(tmp_path)]) == 2
    assert "error: Could not download" in capsys.readouterr().err


def test_expected_architecture_names_missing_units_and_other_files(tmp_path, r50_params):
    damaged = tmp_path / "d.npz"
    np.savez(damaged, **{k: v for k, v in r50_params.items() if "block4/unit03" not in k})
    with pytest.raises(CheckpointError, match="matches no released architecture"):
        checkpoint.load_params(damaged)
    with pytest.raises(CheckpointError, match=r"9 missing key\(s\), first "
                                              r"'resnet/block4/unit03/a/group_norm/gamma'"):
        checkpoint.load_params(damaged, expected=R50)
    with pytest.raises(CheckpointError, match="holds a R50x1, but a R50x3 was asked for"):
        checkpoint.load_params(_saved(tmp_path, r50_params),
                               expected=parse_arch("R50x3"))


def _saved(tmp_path, params):
    path = tmp_path / "ok.npz"
    np.savez(path, **params)
    return path
