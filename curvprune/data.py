"""Datasets: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` and calibration sets.

``apt-get install dataset-fashion-mnist`` puts the IDX files under
``/usr/share/datasets/fashion-mnist/``; :func:`fashion_mnist` reads them (gzipped or not) with no
download. :func:`load_dataset` opens that or a torchvision dataset already on disk by a short
spec (``"fashion-mnist"``, ``"mnist:DIR"``, ``"cifar10:DIR"``, ``"cifar100:DIR"``,
``"imagefolder:DIR"``); nothing is ever downloaded. :func:`class_balanced_calibration` builds
the paper's calibration set: ``k`` correctly classified examples per class;
:func:`random_calibration` a plain seeded random batch.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

__all__ = ["FASHION_MNIST_DIR", "read_idx", "fashion_mnist", "load_dataset",
           "class_balanced_calibration", "random_calibration"]

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
                  pad_to: int | None = None, channels: int = 1
                  ) -> torch.utils.data.TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of ``[N, 1, 28, 28]`` floats in [0, 1] and labels.

    Args:
        train: the 60k training split (else the 10k test split).
        root: folder of the IDX files (default ``/usr/share/datasets/fashion-mnist`` or the
            ``CURVPRUNE_FASHION_MNIST`` environment variable).
        pad_to: zero-pad the images symmetrically to this size (e.g. 32 for VGG-style nets).
        channels: 1 (grey), or 3 to repeat the grey channel for RGB models.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}.")
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
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
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
    from .calibration import model_device, scoring_mode

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)
    device = model_device(model)
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


_TORCHVISION = {"mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_KINDS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder")


def load_dataset(spec: str, train: bool = True, *, pad_to: int | None = None,
                 image_size: int | tuple[int, int] | None = None, grayscale: bool = False,
                 transform=None):
    """Open a dataset already on disk by a short spec; nothing is downloaded.

    Specs:

    * ``"fashion-mnist"`` or ``"fashion-mnist:DIR"``: the IDX files (default folder
      ``/usr/share/datasets/fashion-mnist``), as :func:`fashion_mnist` (a ``TensorDataset``).
    * ``"mnist:DIR"``, ``"cifar10:DIR"``, ``"cifar100:DIR"``: ``torchvision.datasets.MNIST`` /
      ``CIFAR10`` / ``CIFAR100`` with ``root=DIR`` and ``download=False`` (the layout
      torchvision itself writes: ``DIR/MNIST/raw``, ``DIR/cifar-10-batches-py``,
      ``DIR/cifar-100-python``). Items are ``(float tensor in [0, 1], int label)``.
    * ``"imagefolder:DIR"``: ``torchvision.datasets.ImageFolder`` on ``DIR/train`` or
      ``DIR/val`` (``DIR/test``) when they exist, else on ``DIR`` itself (one sub-folder per
      class), images converted to RGB (or grayscale), resized to ``image_size`` and made
      tensors.

    Args:
        spec: see above.
        train: the training split (else the test/validation split).
        pad_to: zero-pad square images to this size (Fashion-MNIST, MNIST and CIFAR only).
        image_size: resize to this size (an int means square), as the models need one input
            size; needed for ImageFolder when its images differ in size, optional otherwise.
        grayscale: ImageFolder only: one channel instead of RGB.
        transform: replaces the default transform of the torchvision datasets entirely.

    Raises:
        ValueError: an unknown kind or a missing ``DIR``.
        FileNotFoundError: the files are not there (the message says what was expected).
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string such as 'cifar10:/data', not "
                        f"{type(spec).__name__}.")
    kind, sep, where = spec.partition(":")
    kind = kind.strip().lower().replace("_", "-")
    if kind in ("fashionmnist", "fmnist"):
        kind = "fashion-mnist"
    if kind not in _KINDS:
        raise ValueError(f"unknown dataset {kind!r} in {spec!r}; use one of "
                         f"{[k + (':DIR' if k != 'fashion-mnist' else '') for k in _KINDS]}.")
    if kind == "fashion-mnist":
        dataset = fashion_mnist(train=train, root=where or None, pad_to=pad_to)
        if image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else image_size
            images = nn.functional.interpolate(dataset.tensors[0], size=tuple(size),
                                               mode="bilinear", align_corners=False)
            dataset = torch.utils.data.TensorDataset(images, dataset.tensors[1])
        return dataset
    if not sep or not where:
        raise ValueError(f"{kind} needs a folder: '{kind}:DIR' (got {spec!r}).")
    root = Path(where).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{spec!r}: folder {root} does not exist.")
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    steps: list = []
    if kind == "imagefolder":
        steps.append(T.Grayscale(1) if grayscale else T.Lambda(_to_rgb))
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        steps.append(T.Resize(size))
    steps.append(T.ToTensor())
    if pad_to is not None:
        if kind == "imagefolder":
            raise ValueError("pad_to applies to square datasets; use image_size for ImageFolder.")
        steps.append(T.Lambda(lambda x: _pad(x, pad_to)))
    chosen = transform if transform is not None else T.Compose(steps)

    if kind == "imagefolder":
        split = [root / "train"] if train else [root / "val", root / "test"]
        folder = next((p for p in split if p.is_dir()), root)
        try:
            return tvd.ImageFolder(str(folder), transform=chosen)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{spec!r}: no class folders with images under {folder} ({error})."
            ) from error
    cls = getattr(tvd, _TORCHVISION[kind])
    try:
        return cls(str(root), train=train, download=False, transform=chosen)
    except RuntimeError as error:  # torchvision: "Dataset not found. You can use download=True"
        expected = {"mnist": f"{root}/MNIST/raw/*-ubyte(.gz)",
                    "cifar10": f"{root}/cifar-10-batches-py/",
                    "cifar100": f"{root}/cifar-100-python/"}[kind]
        raise FileNotFoundError(
            f"{spec!r}: torchvision's {_TORCHVISION[kind]} files were not found (expected "
            f"{expected}); curvprune never downloads, so put the files there first "
            f"(torchvision: {error})."
        ) from error


def _to_rgb(image):
    return image.convert("RGB")


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    total = size - x.shape[-1]
    if total < 0:
        raise ValueError(f"pad_to={size} is smaller than the images ({x.shape[-1]}).")
    return nn.functional.pad(x, (total // 2, total - total // 2) * 2)


def random_calibration(dataset, n: int, seed: int = 0, *, with_targets: bool = True):
    """A plain random calibration batch: ``n`` distinct examples drawn with a seeded generator.

    Unlike :func:`class_balanced_calibration` it needs no model and does not look at labels or
    predictions. Returns ``(inputs, targets)`` (or just ``inputs`` with ``with_targets=False``),
    stacked in the drawn order.

    Raises:
        ValueError: ``n`` below 1 or above ``len(dataset)``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}.")
    if n > len(dataset):
        raise ValueError(f"n={n} is larger than the dataset ({len(dataset)} examples).")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=generator)[:n].tolist()
    items = [dataset[i] for i in idx]
    xs = torch.stack([torch.as_tensor(item[0]) for item in items])
    if not with_targets:
        return xs
    ys = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
    return xs, ys
