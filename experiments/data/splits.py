"""A validation split carved from the training data, and a check of the labels.

The validation examples are a seeded random subset of the training split, the
same for every run seed, so that hyper-parameters are chosen on data that no run
trains on and the test split stays unseen until the end::

    train_indices, validation_indices = validation_split(len(labels), fraction=0.1, seed=0)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from experiments.errors import ExperimentError

Batch = dict[str, np.ndarray]


def validation_size(num_examples: int, fraction: float) -> int:
    """Validation examples held out of ``num_examples``: ``round(fraction * N)``, >= 1 if > 0."""
    if not 0.0 <= fraction < 1.0:
        raise ExperimentError(f"validation_fraction={fraction} must lie in [0, 1).")
    size = round(fraction * num_examples)
    if fraction > 0:
        size = max(size, 1)
    if size >= num_examples:
        raise ExperimentError(
            f"validation_fraction={fraction} of {num_examples} examples leaves none to train on."
        )
    return size


def validation_split(
    num_examples: int, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint ``(train_indices, validation_indices)`` of ``range(num_examples)``.

    Args:
        num_examples: size N of the training split.
        fraction: share of the examples held out for validation, in [0, 1).
        seed: the split's seed; the split is a function of ``(N, fraction, seed)``.

    Returns:
        Two sorted int64 index arrays covering ``range(N)`` once; the second has
        ``validation_size(N, fraction)`` entries.
    """
    size = validation_size(num_examples, fraction)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), num_examples])).permutation(
        num_examples
    )
    return np.sort(order[size:]), np.sort(order[:size])


def take(arrays: Mapping[str, np.ndarray], indices: np.ndarray) -> Batch:
    """The examples ``indices`` [K] of in-memory arrays ``{key: [N, ...]}``."""
    return {key: np.asarray(value)[indices] for key, value in arrays.items()}


def check_labels(labels: np.ndarray, num_classes: int, *, split: str) -> None:
    """Raises ``ExperimentError`` naming ``split`` and the values if a label is outside
    ``[0, num_classes)``."""
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        values = np.unique(bad)
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ExperimentError(
            f"The {split!r} split has {bad.size} labels outside [0, {num_classes}): {shown}."
        )
