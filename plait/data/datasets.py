"""The shipped datasets: real handwritten digits, and a regression problem with known answers.

Each builder returns ``(train, test, info)`` where ``info`` describes the data to the model
factory (``in_features``, ``num_classes``, ...). A ``path`` loads the same arrays from an
``.npz`` file instead, so a user's own data goes through the same code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from plait.errors import PlaitError, first_line


class ArrayDataset(TensorDataset):
    """A TensorDataset that hands DataLoader a whole batch with one indexing op.

    DataLoader calls ``__getitems__`` with the batch's indices when a dataset has it; the
    result goes through ``collate_fn``, so pair it with ``collate_fn=stacked``.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def stacked(batch):
    """DataLoader ``collate_fn`` for ArrayDataset: the batch is already stacked."""
    return batch


def check_data_path(name: str, path: str) -> None:
    """The file ``data.path`` names exists and is of the dataset's kind: an ``.npz`` archive
    (numpy's ``savez``, a zip file) for the array datasets, any readable file for ``text``."""
    file = Path(path)
    if not file.is_file():
        raise PlaitError(f"data.path: dataset file not found: {path}" if not file.exists()
                         else f"data.path: {path} is not a file")
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise PlaitError(f"data.path: cannot read {path}: {exc.strerror or exc}") from None
    if name in ARRAY_FILES and head != b"PK\x03\x04":
        raise PlaitError(f"data.path: {path} is not an .npz file (numpy.savez) holding the arrays "
                         f"{' and '.join(ARRAY_FILES[name])}")


def _load_npz(path: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    check_data_path(dataset, path)
    names, file = ARRAY_FILES[dataset], Path(path)
    try:
        with np.load(file, allow_pickle=False) as arrays:
            missing = [n for n in names if n not in arrays]
            if missing:
                raise PlaitError(f"data.path: {path} has no array named {missing[0]!r} (needs {names})")
            return arrays[names[0]], arrays[names[1]]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # ValueError: e.g. an array of objects
        raise PlaitError(f"data.path: cannot read {path} as .npz: {first_line(exc)}") from None


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train/test split: a permutation seeded by the data seed, not the training seed."""
    if not 0.0 < test_fraction < 1.0:
        raise PlaitError(f"data.args.test_fraction={test_fraction} must be between 0 and 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits file, read as ``sklearn.datasets.load_digits`` reads it (the same
    values) without importing scikit-learn, which would cost each process about a second."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise PlaitError("data.name = 'digits' reads the digits bundled with scikit-learn: pip install scikit-learn, "
                         "or give data.path an .npz of images and labels")
    file = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(file, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits(path: str | None = None, size: int = 28, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled handwritten digits (1,797 images, 8x8), upsampled to ``size``.

    With ``path``: an ``.npz`` holding ``images`` (N, H, W) and integer ``labels`` (N,).
    """
    if path is None:
        images, labels = _bundled_digits()
        images = images / 16.0
    else:
        images, labels = _load_npz(path, "digits")
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).unsqueeze(1)  # [N, 1, h, w]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # [N, 1, size, size]
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    train_idx, test_idx = _split(len(x), test_fraction, seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    info = {"in_features": size * size, "num_classes": int(y.max()) + 1, "kind": "classification"}
    return ArrayDataset(x[train_idx], y[train_idx]), ArrayDataset(x[test_idx], y[test_idx]), info


def regression(
    path: str | None = None,
    samples: int = 1024,
    features: int = 8,
    noise: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
):
    """y = X w + b + noise: Gaussian features, coefficients drawn from ``seed``.

    With ``path``: an ``.npz`` holding ``x`` (N, F) and ``y`` (N,).
    """
    if path is None:
        if samples < 2 or features < 1:
            raise PlaitError(f"data.args: need samples >= 2 and features >= 1, got {samples}, {features}")
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, features, generator=gen, dtype=torch.float64)
        w = torch.randn(features, generator=gen, dtype=torch.float64)
        b = torch.randn((), generator=gen, dtype=torch.float64)
        y = x @ w + b + noise * torch.randn(samples, generator=gen, dtype=torch.float64)
    else:
        xa, ya = _load_npz(path, "regression")
        x, y = torch.as_tensor(xa, dtype=torch.float64), torch.as_tensor(ya, dtype=torch.float64)
        if x.ndim != 2 or y.shape != (len(x),):
            raise PlaitError(f"data.path: {path}: x must be (N, F) and y (N,), got {tuple(x.shape)}, {tuple(y.shape)}")
    train_idx, test_idx = _split(len(x), test_fraction, seed)
    x32, y32 = x.float(), y.float().unsqueeze(1)  # [N, F], [N, 1]
    info = {"in_features": x.shape[1], "kind": "regression"}
    return ArrayDataset(x32[train_idx], y32[train_idx]), ArrayDataset(x32[test_idx], y32[test_idx]), info


# A fixed, listed slice of the Python standard library's own source: text every machine has.
STDLIB_FILES = ("textwrap.py", "string.py", "shlex.py", "heapq.py", "bisect.py", "fractions.py",
                "statistics.py", "difflib.py")


def text(path: str | None = None, block_size: int = 64, max_chars: int = 0, test_fraction: float = 0.1,
         vocab_multiple: int = 8, seed: int = 0):
    """Characters of ``STDLIB_FILES`` (read at run time from this Python's stdlib), as windows of
    ``block_size`` tokens; the target is the window shifted by one. With ``path``: a text file.

    The vocabulary (sorted characters) is padded to a multiple of ``vocab_multiple`` so it splits
    over tensor-parallel ranks; ``info["unigram_entropy"]`` is the corpus's character entropy (nats).
    """
    import sysconfig

    if path is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        corpus = "".join((stdlib / name).read_text(encoding="utf-8") for name in STDLIB_FILES)
    else:
        check_data_path("text", path)
        corpus = Path(path).read_text(encoding="utf-8", errors="replace")
    if max_chars:
        corpus = corpus[:max_chars]
    if len(corpus) < 2 * (block_size + 1):
        raise PlaitError(f"data.args: the corpus ({len(corpus)} characters) is too short for block_size {block_size}")
    chars = sorted(set(corpus))
    ids = torch.as_tensor(np.searchsorted(np.array(chars), np.array(list(corpus))), dtype=torch.int64)  # [chars]
    counts = torch.bincount(ids).double()
    probs = counts[counts > 0] / counts.sum()
    n = (len(ids) - 1) // block_size
    x, y = ids[: n * block_size].view(n, block_size), ids[1 : n * block_size + 1].view(n, block_size)
    train_idx, test_idx = _split(n, test_fraction, seed)
    vocab = -(-len(chars) // vocab_multiple) * vocab_multiple
    info = {"vocab_size": vocab, "block_size": block_size, "kind": "lm", "characters": len(corpus),
            "unigram_entropy": float(-(probs * probs.log()).sum())}
    return ArrayDataset(x[train_idx], y[train_idx]), ArrayDataset(x[test_idx], y[test_idx]), info


DATASETS = {"digits": digits, "regression": regression, "text": text}
ARRAY_FILES = {"digits": ("images", "labels"), "regression": ("x", "y")}
"""The arrays an ``.npz`` given as ``data.path`` must hold, per dataset."""
