"""Dataset loading by spec and calibration sets, on tiny fake data written to tmp_path."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from curvprune.data import (
    class_balanced_calibration,
    fashion_mnist,
    load_dataset,
    random_calibration,
    read_idx,
)


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", 12, True), ("t10k", 7, False)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte",
                  (np.arange(n) % 3).astype(np.uint8), gz)
    return tmp_path


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_spec(fake_fmnist):
    train = load_dataset(f"fashion-mnist:{fake_fmnist}", train=True)
    test = load_dataset(f"fashion-mnist:{fake_fmnist}", train=False, pad_to=32)
    assert len(train) == 12 and len(test) == 7
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert test[0][0].shape == (1, 32, 32)
    assert torch.equal(train.tensors[0], fashion_mnist(True, root=fake_fmnist).tensors[0])
    resized = load_dataset(f"fashion-mnist:{fake_fmnist}", train=False, image_size=14)
    assert resized[0][0].shape == (1, 14, 14)


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path}")


@pytest.mark.parametrize("kind", ["mnist", "cifar10", "cifar100"])
def test_torchvision_missing_files_clear_error(tmp_path, kind):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_dataset(f"{kind}:{tmp_path}", train=False)
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn:/tmp")
    with pytest.raises(ValueError, match="needs a folder"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path}")
    with pytest.raises(TypeError):
        load_dataset(3)


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for k in range(2):
                size = (10 + k, 12)
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    train = load_dataset(f"imagefolder:{tmp_path}", train=True, image_size=(8, 8))
    val = load_dataset(f"imagefolder:{tmp_path}", train=False, image_size=8, grayscale=True)
    assert len(train) == 4 and train.classes == ["cat", "dog"]
    x, y = train[3]
    assert x.shape == (3, 8, 8) and y == 1
    assert val[0][0].shape == (1, 8, 8)
    xs, ys = random_calibration(train, 3, seed=1)
    assert xs.shape == (3, 3, 8, 8) and ys.dtype == torch.int64


def test_random_calibration(fake_fmnist):
    data = load_dataset(f"fashion-mnist:{fake_fmnist}")
    xs, ys = random_calibration(data, 5, seed=3)
    again, _ = random_calibration(data, 5, seed=3)
    other, _ = random_calibration(data, 5, seed=4)
    assert xs.shape == (5, 1, 28, 28) and ys.shape == (5,)
    assert torch.equal(xs, again) and not torch.equal(xs, other)
    rows = {tuple(x.flatten().tolist()) for x in xs}
    assert len(rows) == 5  # distinct examples
    assert random_calibration(data, 2, with_targets=False).shape == (2, 1, 28, 28)
    for bad in (0, -1, 13, 2.5):
        with pytest.raises(ValueError):
            random_calibration(data, bad)


def test_class_balanced_calibration_on_fake(fake_fmnist):
    data = load_dataset(f"fashion-mnist:{fake_fmnist}")

    class Oracle(torch.nn.Module):  # predicts the true label of the fake data (index % 3)
        def __init__(self):
            super().__init__()
            self.lookup = {tuple(x.flatten()[:8].tolist()): int(y) for x, y in data}
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            labels = [self.lookup[tuple(r.flatten()[:8].tolist())] for r in x]
            return torch.nn.functional.one_hot(torch.tensor(labels), 3).float()

    xs, ys = class_balanced_calibration(Oracle(), data, 2, num_classes=3)
    assert xs.shape == (6, 1, 28, 28) and ys.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="fewer than"):
        class_balanced_calibration(Oracle(), data, 5, num_classes=3)
