"""Datasets: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` and calibration sets.

``apt-get install dataset-fashion-mnist`` puts the IDX files under
``/usr/share/datasets/fashion-mnist/``; :func:`fashion_mnist` reads them (gzipped or not) with no
download. :func:`class_balanced_calibration` builds the paper's calibration set: ``k``
correctly classified examples per class.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

__all__ = ["FASHION_MNIST_DIR", "read_idx", "fashion_mnist", "class_balanced_calibration"]

FASHION_MNIST_DIR = Path(os.environ.get("CURVPRUNE_FASHION_MNIST",
                                        "/usr/share/datasets/fashion-mnist"))
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a NumPy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
             0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX data type 0x{data[2]:02x}.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    array = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values.")
    return array.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found under {root}; install Debian's "
        "'dataset-fashion-mnist' package or pass root= to a folder holding the IDX files."
    )


def fashion_mnist(train: bool = True, root: str | Path | None = None,
                  pad_to: int | None = None) -> torch.utils.data.TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of ``[N, 1, 28, 28]`` floats in [0, 1] and labels.

    Args:
        train: the 60k training split (else the 10k test split).
        root: folder of the IDX files (default ``/usr/share/datasets/fashion-mnist`` or the
            ``CURVPRUNE_FASHION_MNIST`` environment variable).
        pad_to: zero-pad the images symmetrically to this size (e.g. 32 for VGG-style nets).
    """
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    images_file, labels_file = _FILES[train]
    images = torch.from_numpy(read_idx(_find(root, images_file)).copy()).float().div_(255.0)
    labels = torch.from_numpy(read_idx(_find(root, labels_file)).astype(np.int64))
    images = images.unsqueeze(1)
    if pad_to is not None and pad_to != images.shape[-1]:
        total = pad_to - images.shape[-1]
        if total < 0:
            raise ValueError(f"pad_to={pad_to} is smaller than the images ({images.shape[-1]}).")
        images = nn.functional.pad(images, (total // 2, total - total // 2) * 2)
    return torch.utils.data.TensorDataset(images, labels)


def class_balanced_calibration(
    model: nn.Module, dataset, per_class: int, *, num_classes: int | None = None,
    batch_size: int = 256, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's calibration set: ``per_class`` correctly classified examples of each class.

    Examples are visited in a seeded random order; the model is run in eval mode without
    gradients and its training flags are restored.

    Raises:
        ValueError: if some class has fewer than ``per_class`` correctly classified examples.
    """
    from .calibration import scoring_mode

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chosen: dict[int, list[torch.Tensor]] = {}
    with scoring_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [dataset[int(i)] for i in idx]
            x = torch.stack([b[0] for b in batch])
            y = torch.tensor([int(b[1]) for b in batch])
            pred = model(x.to(device)).argmax(1).cpu()
            for xi, yi, pi in zip(x, y.tolist(), pred.tolist()):
                if pi == yi and len(chosen.setdefault(yi, [])) < per_class:
                    chosen[yi].append(xi)
            classes = num_classes or (max(chosen) + 1 if chosen else 0)
            if len(chosen) == classes and all(len(v) == per_class for v in chosen.values()):
                if num_classes is not None or start + batch_size >= len(order):
                    break
    classes = num_classes if num_classes is not None else (max(chosen) + 1 if chosen else 0)
    short = [c for c in range(classes) if len(chosen.get(c, [])) < per_class]
    if short:
        raise ValueError(
            f"classes {short} have fewer than {per_class} correctly classified examples."
        )
    xs = torch.cat([torch.stack(chosen[c]) for c in range(classes)])
    ys = torch.arange(classes).repeat_interleave(per_class)
    return xs, ys
