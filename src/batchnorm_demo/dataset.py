"""The demo's dataset record (:class:`Dataset`) and its seeded, stratified splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "stratified_split", "validation_split"]


@dataclass(frozen=True)
class Dataset:
    """A classification dataset split into train and test parts.

    Attributes
    ----------
    name : str
    x_train, x_test : ndarray, shape (N, D), float64
    y_train, y_test : ndarray, shape (N,), int64 in [0, n_classes)
    description : str
        Where the data came from, for reports.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    description: str

    @property
    def n_features(self) -> int:
        """Number of input features (columns of ``x_train``)."""
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of classes (largest label + 1, over both splits)."""
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    def summary(self) -> dict:
        """Name, description and sizes as a JSON-ready dict (for results.json)."""
        return {
            "name": self.name,
            "description": self.description,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "n_features": self.n_features,
            "n_classes": self.n_classes,
        }


def stratified_split(
    y: np.ndarray, n_test: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with exactly ``n_test`` test items, classes in proportion.

    Each class gets ``n_test * count / N`` test items, rounded by largest remainder so the
    total is exact; items are drawn at random within each class.
    """
    y = np.asarray(y)
    if not 0 < n_test < y.size:
        raise ValueError(f"n_test must be in (0, {y.size}); got {n_test}")
    classes, counts = np.unique(y, return_counts=True)
    quota = n_test * counts / y.size
    take = np.floor(quota).astype(int)
    remainder_order = np.argsort(-(quota - take), kind="stable")
    take[remainder_order[: n_test - take.sum()]] += 1
    test = []
    for c, k in zip(classes, take, strict=True):
        idx = np.flatnonzero(y == c)
        test.append(rng.choice(idx, size=k, replace=False))
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(y.size), test_idx)
    return rng.permutation(train_idx), rng.permutation(test_idx)


def validation_split(
    data: Dataset, n_val: int, rng: np.random.Generator
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Carve a stratified validation set out of the *training* part of ``data``.

    Parameters
    ----------
    data : Dataset
        The dataset; its test part is passed through untouched.
    n_val : int
        Number of training items moved to the validation set.
    rng : numpy.random.Generator
        Source of the random split.

    Returns
    -------
    train : Dataset
        ``data`` with its training part reduced to the remaining items.
    x_val, y_val : ndarray
        The validation items (never used for training).
    """
    keep, val = stratified_split(data.y_train, n_val, rng)
    train = Dataset(
        data.name,
        data.x_train[keep],
        data.y_train[keep],
        data.x_test,
        data.y_test,
        f"{data.description}; {keep.size} of its training items "
        f"trained on, {val.size} held out for validation",
    )
    return train, data.x_train[val], data.y_train[val]
