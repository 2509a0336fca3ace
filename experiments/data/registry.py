"""Known datasets: shapes, classes, keys, splits and input normalization.

Every dataset is read through ``tfds.data_source`` as array_record files:

* ``digits`` and ``mnist1d`` are built locally on first use (see ``builders``);
* ``mnist``, ``fashion_mnist``, ``cifar10`` and ``cifar100`` are downloaded and
  prepared by TFDS on first use. Preparing them (not reading them) needs
  TensorFlow, since TFDS's builders encode images with it, and the
  ``importlib_resources`` package (tensorflow/datasets#11212).

Normalization to float32 model inputs, ``image = raw / scale``:

* image datasets (uint8 0..255): ``scale = 255``, inputs in [0, 1];
* ``digits`` (uint8 0..16): ``scale = 16``, inputs in [0, 1];
* ``mnist1d`` (float32): ``scale = 1``; the generator already standardized the
  signals (mean 0, std 1 over the generated set), so nothing more is done.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from experiments.data import builders
from experiments.data.loader import Batch, gather


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset and turn its examples into model inputs.

    Attributes:
        name: dataset name in TFDS (``tfds.data_source(name, ...)``).
        input_shape: shape of one model input, e.g. (28, 28, 1).
        num_classes: number of classes; labels are in ``[0, num_classes)``.
        image_key: feature holding the inputs (``"image"``, or ``"x"`` for mnist1d).
        scale: float32 inputs are ``raw / scale``.
        offline: True when the dataset is built locally, with no download.
        label_key: feature holding the integer labels.
        train_split: name of the training split.
        eval_split: name of the evaluation split.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    image_key: str
    scale: float
    offline: bool
    label_key: str = "label"
    train_split: str = "train"
    eval_split: str = "test"

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Maps raw inputs [K, *input_shape] to float32 model inputs of the same shape."""
        return np.asarray(raw, dtype=np.float32) / np.float32(self.scale)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("digits", (8, 8, 1), 10, "image", scale=16.0, offline=True),
        DatasetSpec("mnist1d", (40,), 10, "x", scale=1.0, offline=True),
        DatasetSpec("mnist", (28, 28, 1), 10, "image", scale=255.0, offline=False),
        DatasetSpec("fashion_mnist", (28, 28, 1), 10, "image", scale=255.0, offline=False),
        DatasetSpec("cifar10", (32, 32, 3), 10, "image", scale=255.0, offline=False),
        DatasetSpec("cifar100", (32, 32, 3), 100, "image", scale=255.0, offline=False),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """Returns the spec of a known dataset.

    Raises:
        ValueError: if ``name`` is unknown; the message lists the known names.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}.")
    return DATASETS[name]


def load_source(
    name: str, split: str, data_dir: str | os.PathLike | None = None, **builder_kwargs: Any
) -> Sequence[dict[str, Any]]:
    """Returns a random-access source of one split, preparing the dataset if needed.

    Args:
        name: a known dataset name (see ``DATASETS``).
        split: split name, e.g. ``"train"`` or ``"test"`` (TFDS slicing such as
            ``"train[:10%]"`` works too).
        data_dir: TFDS data directory; None for TFDS's default.
        **builder_kwargs: passed to the builder, e.g. ``num_samples=2000`` for
            ``mnist1d``.

    Returns:
        A ``tfds.data_source`` split: ``len()``, ``source[i]`` and
        ``source.__getitems__(indices)`` returning example dicts of NumPy values.
    """
    spec = get_spec(name)
    if spec.offline:
        builders.prepare(name, data_dir, **builder_kwargs)
    return tfds.data_source(
        spec.name,
        split=split,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        # With a data_dir, TFDS would otherwise prepare TFRecord files, which
        # have no random access.
        builder_kwargs={"file_format": builders.FILE_FORMAT, **builder_kwargs},
    )


def read_arrays(
    source: Sequence[dict[str, Any]], spec: DatasetSpec, *, chunk_size: int = 4096
) -> Batch:
    """Reads a whole split into memory, normalized.

    Args:
        source: a random-access source of the dataset described by ``spec``.
        spec: the dataset's spec (keys and normalization).
        chunk_size: examples read per call.

    Returns:
        ``{"image": float32 [N, *input_shape], "label": int32 [N]}`` in source order.
    """
    total = len(source)
    if total == 0:
        raise ValueError(f"The {spec.name!r} source is empty.")
    chunks = [
        gather(
            source,
            np.arange(start, min(start + chunk_size, total)),
            image_key=spec.image_key,
            label_key=spec.label_key,
            normalize=spec.normalize,
        )
        for start in range(0, total, chunk_size)
    ]
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in ("image", "label")}


def load_split(
    name: str, split: str, data_dir: str | os.PathLike | None = None, **builder_kwargs: Any
) -> Batch:
    """Loads a whole split as normalized arrays (prepares the dataset if needed).

    Returns:
        ``{"image": float32 [N, *input_shape], "label": int32 [N]}``.
    """
    return read_arrays(load_source(name, split, data_dir, **builder_kwargs), get_spec(name))
