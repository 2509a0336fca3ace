"""Offline datasets as local TFDS builders, written as array_record files.

Two small datasets need no download, so experiments and tests run anywhere:

* ``digits``: scikit-learn's bundled copy of the UCI handwritten digits, 1797
  images of 8x8 pixels, 10 classes. ``image`` is uint8 [8, 8, 1] with values
  0..16 (not 0..255); ``label`` is an int64 class id in [0, 10). The train/test
  split is a fixed permutation (seed 0): 1437 train and 360 test examples.
* ``mnist1d``: generated locally by the ``mnist1d`` package (``make_dataset``,
  never the downloading ``get_dataset``). ``x`` is float32 [40], already
  standardized by the generator (mean 0, std 1 over the generated set);
  ``label`` is an int64 class id in [0, 10). 80% train, 20% test. The sample
  count is the builder config: ``mnist1d/n12500`` (the default, 10000 train and
  2500 test) or any ``num_samples`` passed to the builder.

The example order inside the files is TFDS's (a deterministic hash of the
keys), not the generation order. Both are ordinary
``tfds.core.GeneratorBasedBuilder`` subclasses, so once built
(``prepare``) they are read exactly like a downloaded TFDS dataset::

    prepare("digits", data_dir)
    source = tfds.data_source("digits", split="train", data_dir=data_dir)

Building needs neither TensorFlow nor network access (checked with
tensorflow-datasets 4.9.10).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

FILE_FORMAT = "array_record"
_NUM_CLASSES = 10

_DIGITS_SPLIT_SEED = 0
_DIGITS_TRAIN_FRACTION = 0.8

_MNIST1D_DEFAULT_NUM_SAMPLES = 12_500
_MNIST1D_SEED = 42
_MNIST1D_TRAIN_FRACTION = 0.8
_MNIST1D_LENGTH = 40

# TFDS derives a builder's `code_path` (used to look for a checksums file) through
# `importlib_resources`, which tensorflow-datasets 4.9.10 does not install on
# Python >= 3.9 (tensorflow/datasets#11212). Giving the path directly avoids it.
_CODE_PATH = epath.Path(__file__)


class Digits(tfds.core.GeneratorBasedBuilder):
    """UCI handwritten digits (scikit-learn's bundled copy) as a TFDS dataset."""

    name = "digits"
    code_path = _CODE_PATH
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 1437 train / 360 test, split seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "UCI ML handwritten digits from scikit-learn: 8x8 uint8 images "
                "with values 0..16, 10 classes, fixed 80/20 split."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Nothing to download.
        images, labels = _load_digits()
        order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
        num_train = int(_DIGITS_TRAIN_FRACTION * len(labels))
        return {
            "train": self._generate_examples(images, labels, order[:num_train]),
            "test": self._generate_examples(images, labels, order[num_train:]),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yields ``(key, example)``; the key is the index in scikit-learn's order."""
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits as uint8 images [1797, 8, 8, 1] and labels [1797]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


@dataclasses.dataclass
class Mnist1dConfig(tfds.core.BuilderConfig):
    """Config of the ``mnist1d`` builder.

    Attributes:
        num_samples: total number of generated examples (train + test); a
            positive multiple of 10 (the generator makes the same number per class).
    """

    num_samples: int = _MNIST1D_DEFAULT_NUM_SAMPLES


def mnist1d_config(num_samples: int) -> Mnist1dConfig:
    """Returns the ``mnist1d`` config named ``f"n{num_samples}"``.

    Raises:
        ValueError: if ``num_samples`` is not a positive multiple of 10.
    """
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int | np.integer)
        or num_samples <= 0
        or num_samples % _NUM_CLASSES
    ):
        raise ValueError(
            f"num_samples must be a positive multiple of {_NUM_CLASSES} "
            f"(one share per class), got {num_samples!r}."
        )
    num_samples = int(num_samples)
    num_train = int(_MNIST1D_TRAIN_FRACTION * num_samples)
    return Mnist1dConfig(
        name=f"n{num_samples}",
        description=f"{num_train} train / {num_samples - num_train} test examples.",
        num_samples=num_samples,
    )


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D (Greydanus, 2020), generated locally, as a TFDS dataset.

    Args:
        num_samples: optional total example count; builds the config
            ``f"n{num_samples}"`` (mutually exclusive with ``config``).
        **kwargs: passed to ``tfds.core.DatasetBuilder`` (``data_dir``,
            ``config``, ``file_format``, ...).
    """

    name = "mnist1d"
    code_path = _CODE_PATH
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: mnist1d 0.0.2 generator, seed 42."}
    BUILDER_CONFIGS = [mnist1d_config(_MNIST1D_DEFAULT_NUM_SAMPLES)]

    def __init__(self, *, num_samples: int | None = None, **kwargs: Any):
        config = kwargs.get("config")
        if num_samples is not None:
            if config is not None:
                raise ValueError(
                    f"Pass either num_samples or config, not both: "
                    f"num_samples={num_samples!r}, config={config!r}."
                )
            requested = mnist1d_config(num_samples)
            # A registered config (the default count) must be asked for by name.
            registered = requested.name in self.builder_configs
            kwargs["config"] = requested.name if registered else requested
        elif isinstance(config, str) and config not in self.builder_configs:
            kwargs["config"] = _config_from_name(config)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "MNIST-1D: 1D signals of length 40 (float32, standardized by the "
                "generator) drawn from 10 digit templates, 80/20 split."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(_MNIST1D_LENGTH,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
                }
            ),
            supervised_keys=("x", "label"),
            homepage="https://github.com/greydanus/mnist1d",
            citation=(
                "Sam Greydanus and Dmitry Kobak. Scaling Down Deep Learning with "
                "MNIST-1D. ICML 2024. https://arxiv.org/abs/2011.14439"
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Nothing to download.
        data = generate_mnist1d(self.builder_config.num_samples)
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(
        self, signals: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yields ``(key, example)``; the key is the index in the generated split."""
        for index, (signal, label) in enumerate(zip(signals, labels, strict=True)):
            yield index, {"x": signal.astype(np.float32), "label": int(label)}


def _config_from_name(config_name: str) -> Mnist1dConfig:
    """Parses a config name ``"n<num_samples>"``, e.g. ``"n2000"``."""
    if config_name.startswith("n") and config_name[1:].isdigit():
        return mnist1d_config(int(config_name[1:]))
    raise ValueError(
        f"Unknown mnist1d config {config_name!r}: expected 'n<num_samples>', e.g. 'n12500'."
    )


def generate_mnist1d(num_samples: int) -> dict[str, np.ndarray]:
    """Generates MNIST-1D with the ``mnist1d`` package, without any download.

    Uses ``mnist1d.data.make_dataset`` (``get_dataset`` would try to download a
    pickle first). The generator seeds Python's and NumPy's global random
    state; both are restored afterwards, so calling this has no side effect.

    Args:
        num_samples: total example count, a positive multiple of 10.

    Returns:
        ``x`` float64 [0.8 n, 40], ``y`` int64 [0.8 n], ``x_test`` float64
        [0.2 n, 40] and ``y_test`` int64 [0.2 n], for ``n = num_samples``.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = mnist1d_config(num_samples).num_samples
    args.seed = _MNIST1D_SEED
    args.train_split = _MNIST1D_TRAIN_FRACTION
    with _preserved_global_rng():
        data = make_dataset(args)
    return {key: data[key] for key in ("x", "y", "x_test", "y_test")}


@contextlib.contextmanager
def _preserved_global_rng() -> Iterator[None]:
    """Restores Python's and NumPy's global random state on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()  # noqa: NPY002 (mnist1d seeds the legacy global RNG)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002


OFFLINE_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "digits": Digits,
    "mnist1d": Mnist1d,
}


def prepare(
    name: str, data_dir: str | os.PathLike | None, **builder_kwargs: Any
) -> tfds.core.DatasetBuilder:
    """Builds an offline dataset once, as array_record files under ``data_dir``.

    Idempotent: when the dataset is already prepared in ``data_dir`` the files
    are reused and nothing is generated again.

    Args:
        name: ``"digits"`` or ``"mnist1d"``.
        data_dir: TFDS data directory (created if missing); None for TFDS's
            default (``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
        **builder_kwargs: passed to the builder, e.g. ``num_samples=2000`` for
            ``mnist1d``.

    Returns:
        The prepared builder; ``builder.as_data_source(split)`` reads a split,
        as does ``tfds.data_source(builder.info.full_name.rsplit("/", 1)[0], ...)``.

    Raises:
        ValueError: if ``name`` is not an offline dataset.
    """
    if name not in OFFLINE_BUILDERS:
        raise ValueError(
            f"Unknown offline dataset {name!r}; known offline datasets: {sorted(OFFLINE_BUILDERS)}."
        )
    builder = OFFLINE_BUILDERS[name](
        data_dir=None if data_dir is None else os.fspath(data_dir),
        file_format=FILE_FORMAT,
        **builder_kwargs,
    )
    builder.download_and_prepare(file_format=FILE_FORMAT)
    return builder
