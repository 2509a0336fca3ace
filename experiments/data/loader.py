"""Deterministic, checkpointable, multi-host batches: a Grain pipeline.

Batches are plain NumPy dicts, read from either

* in-memory arrays: a mapping ``{key: [N, ...]}`` of equally long arrays, or
* a random-access source: anything with ``len()`` and ``source[i] -> dict``
  (``tfds.data_source`` splits, read in one call through ``__getitems__``
  where the source has it).

Training batches come from a ``grain.MapDataset`` whose element ``k`` is this
process's part of global batch ``k``::

    range(batches_per_epoch).repeat()       # element k: step k, of epoch k // batches_per_epoch
      .map_with_index(GlobalBatchIndices)   # shuffle per (seed, epoch), global batch of indices
      .map(process slice)                   # this process's contiguous part of it
      .map(read)                            # {key: source[key][indices]}: one gather per key
      .map(transform)                       # optional, e.g. to model inputs and targets
      .map_with_index(augment_batch)        # optional (TrainLoader): views of (seed, step k)

iterated with Grain's checkpointable ``DatasetIterator``: ``get_state()`` is a
small JSON-serializable dict and ``set_state`` resumes exactly there, and
``grain.checkpoint.CheckpointSave`` stores it beside the TrainState
(:mod:`experiments.checkpointing`).

The pipeline carries indices, not examples: an epoch is one permutation of
``range(N)``, a function of ``(seed, epoch)`` only (:func:`epoch_permutation`),
computed once per epoch with NumPy, and each batch is read with one fancy-index
per key. Grain's own ``MapDataset.shuffle`` permutes one index per Python call
(about 10 us each), which on mnist1d-sized arrays (10000 x 40, batch 128)
reads a few hundred batches/s, against about 2 x 10^4 for this pipeline. Each epoch
drops its last ``N % global_batch_size`` examples.

Multi-host: every process computes the same global batch and keeps its
contiguous slice :func:`process_slice`, so concatenating the per-process
batches in process order gives the global batch. (Grain's ``ShardOptions``
would instead give each process a subset of the examples, whose batches do
not concatenate to one process's.)

Evaluation (:func:`eval_batches`) reads a split once in its stored order with
a padded last batch and a ``mask``: plain NumPy, since it has no order to
shuffle and no position worth checkpointing.

Example::

    iterator = train_iterator(arrays, global_batch_size=128, seed=0, keys=("x", "label"))
    batch = next(iterator)          # {"x": [128, 40], "label": [128]} on one process
    state = iterator.get_state()    # JSON; set_state(state) resumes from here
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from experiments.data.augment import Augmentation, augment_batch
from experiments.errors import ExperimentError

Batch = dict[str, np.ndarray]
Source = Mapping[str, np.ndarray] | Sequence[Mapping[str, Any]]
Normalize = Callable[[np.ndarray], np.ndarray]
Transform = Callable[[Batch], Batch]

# In-memory reads are fast and hold the GIL: no threads (Grain's advice). Other
# sources prefetch a few batches in threads, overlapping reads with the step.
IN_MEMORY_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
SOURCE_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def to_float32(images: np.ndarray) -> np.ndarray:
    """Casts raw inputs to float32 without rescaling (the default ``normalize``)."""
    return np.asarray(images, dtype=np.float32)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """Returns the training order of one epoch, a function of ``(seed, epoch)`` only.

    Args:
        num_examples: size of the split, N.
        seed: non-negative integer seed of the run.
        epoch: non-negative epoch number.

    Returns:
        int64 [N], a permutation of ``range(N)``.
    """
    for arg_name, value in (("seed", seed), ("epoch", epoch)):
        if int(value) != value or value < 0:
            raise ValueError(f"{arg_name} must be a non-negative integer, got {value!r}.")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    return rng.permutation(num_examples)


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Returns the contiguous part of a global batch that one process reads.

    Raises:
        ValueError: if ``global_batch_size`` is not divisible by ``process_count``
            or ``process_index`` is not in ``[0, process_count)``.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count), got process_index="
            f"{process_index} and process_count={process_count}."
        )
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    local_batch_size = global_batch_size // process_count
    start = process_index * local_batch_size
    return slice(start, start + local_batch_size)


def num_examples(source: Source, *, label_key: str | None = None) -> int:
    """Number of examples N in ``source``; for arrays, ``label_key`` must be one of them."""
    if isinstance(source, Mapping):
        sizes = {key: len(value) for key, value in source.items()}
        if label_key is not None and label_key not in sizes:
            raise ExperimentError(
                f"label_key {label_key!r} is not in the source keys {sorted(sizes)}."
            )
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Arrays of the source differ in length: {sizes}.")
        return next(iter(sizes.values()))
    return len(source)


def read(source: Source, indices: np.ndarray, *, keys: Sequence[str]) -> Batch:
    """Reads features ``keys`` of examples ``indices`` [K] into ``{key: [K, ...]}``."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(source, Mapping):
        _check_keys(source, keys, "The source arrays")
        return {key: np.asarray(source[key])[indices] for key in keys}
    examples = _read_examples(source, [int(index) for index in indices])
    for index, example in zip(indices, examples, strict=True):
        _check_keys(example, keys, f"Example {index} of the source")
    return {key: np.stack([np.asarray(example[key]) for example in examples]) for key in keys}


@dataclasses.dataclass(frozen=True)
class ClassificationBatch:
    """Transform of read features to ``{"image": float32 [K, ...], "label": int32 [K]}``."""

    image_key: str = "image"
    label_key: str = "label"
    normalize: Normalize = to_float32

    @property
    def keys(self) -> tuple[str, str]:
        return (self.image_key, self.label_key)

    def __call__(self, features: Batch) -> Batch:
        return {
            "image": self.normalize(features[self.image_key]),
            "label": np.asarray(features[self.label_key]).astype(np.int32),
        }


def gather(
    source: Source,
    indices: np.ndarray,
    *,
    image_key: str = "image",
    label_key: str = "label",
    normalize: Normalize = to_float32,
) -> Batch:
    """Reads examples ``indices`` [K] into ``{"image": float32 [K, ...], "label": int32 [K]}``."""
    to_batch = ClassificationBatch(image_key, label_key, normalize)
    return to_batch(read(source, indices, keys=to_batch.keys))


def _check_keys(example: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [key for key in keys if key not in example]
    if missing:
        raise ExperimentError(
            f"{what} has no {missing[0]!r} feature (it has {sorted(example)}): check the "
            "keys read (for a registered dataset, its image_key and label_key in "
            "experiments/data/registry.py)."
        )


def _read_examples(source: Sequence[Mapping[str, Any]], keys: list[int]) -> Sequence[Any]:
    """Reads examples, in one batched read (about 2x faster) where the source has one."""
    read_many = getattr(source, "__getitems__", None)
    if read_many is not None:
        try:
            return read_many(keys)
        except TypeError:
            # Under tfds.testing.mock_data (tensorflow-datasets 4.9.10) the mocked
            # `__getitems__` is not bound to its source and raises TypeError.
            pass
    return [source[key] for key in keys]


def _resolve_slice(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> slice:
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    return process_slice(global_batch_size, process_index, process_count)


class GlobalBatchIndices:
    """Maps a training step to the example indices int64 [global_batch_size] of its batch.

    Step ``k`` is batch ``k % batches_per_epoch`` of epoch ``k // batches_per_epoch``,
    read from ``epoch_permutation(N, seed=seed, epoch=epoch)``; the permutation
    of the latest epoch is cached. Called by Grain as ``map_with_index(step, _)``.
    """

    def __init__(self, num_examples: int, *, global_batch_size: int, seed: int):
        if global_batch_size > num_examples:
            raise ValueError(
                f"global_batch_size={global_batch_size} exceeds the number of "
                f"examples {num_examples}: an epoch would have no batch."
            )
        epoch_permutation(1, seed=seed, epoch=0)  # Validates the seed.
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.batches_per_epoch = num_examples // global_batch_size
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """``epoch_permutation(N, seed=seed, epoch=epoch)``, int64 [N]."""
        cache = self._cache  # One read: prefetch threads may replace it.
        if cache is None or cache[0] != epoch:
            cache = (epoch, epoch_permutation(self.num_examples, seed=self.seed, epoch=epoch))
            self._cache = cache
        return cache[1]

    def __call__(self, step: int, _: Any = None) -> np.ndarray:
        epoch, index_in_epoch = divmod(int(step), self.batches_per_epoch)
        start = index_in_epoch * self.global_batch_size
        return self.permutation(epoch)[start : start + self.global_batch_size]


def train_dataset(
    source: Source,
    *,
    global_batch_size: int,
    seed: int,
    keys: Sequence[str],
    transform: Transform | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """The infinite training pipeline: element ``k`` is this process's part of global batch k.

    Args:
        source: arrays ``{key: [N, ...]}`` or a random-access source of example dicts.
        global_batch_size: batch size summed over all processes.
        seed: non-negative integer; with the epoch it fixes the order.
        keys: the features to read, e.g. ``("image", "label")`` or ``("tokens", "mask")``.
        transform: optional map of a read batch ``{key: [B_local, ...]}`` to the
            batch to yield, e.g. tokens [B_local, L + 1] to inputs and targets
            [B_local, L].
        process_index: this process, default ``jax.process_index()``.
        process_count: number of processes, default ``jax.process_count()``.

    Returns:
        A ``grain.MapDataset`` of batches ``{key: [B_local, ...]}`` (or
        ``transform``'s), ``B_local = global_batch_size // process_count``.
    """
    local = _resolve_slice(global_batch_size, process_index, process_count)
    indices = GlobalBatchIndices(
        num_examples(source), global_batch_size=global_batch_size, seed=seed
    )
    return _pipeline(source, indices, local, keys=tuple(keys), transform=transform)


def _pipeline(
    source: Source,
    indices: GlobalBatchIndices,
    local: slice,
    *,
    keys: tuple[str, ...],
    transform: Transform | None,
    augmentation: Augmentation | None = None,
    with_index: bool = False,
) -> grain.MapDataset:
    def load(local_indices):
        batch = read(source, local_indices, keys=keys)
        if transform is not None:
            batch = transform(batch)
        if with_index:
            batch = {**batch, "index": np.asarray(local_indices, np.int32)}
        return batch

    dataset = (
        grain.MapDataset.range(indices.batches_per_epoch)
        .repeat()
        .map_with_index(indices)
        .map(lambda global_indices: global_indices[local])
        .map(load)
    )
    if augmentation is not None:
        # The view of step k is a function of (seed, k): a resumed run sees the same.
        dataset = dataset.map_with_index(
            lambda step, batch: augment_batch(
                batch,
                augmentation,
                seed=indices.seed,
                step=step,
                global_batch_size=indices.global_batch_size,
                local=local,
            )
        )
    return dataset


def default_read_options(source: Source) -> grain.ReadOptions:
    """No threads for in-memory arrays; a few prefetching threads for other sources."""
    return IN_MEMORY_READ_OPTIONS if isinstance(source, Mapping) else SOURCE_READ_OPTIONS


def train_iterator(
    source: Source,
    *,
    global_batch_size: int,
    seed: int,
    keys: Sequence[str],
    transform: Transform | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator over :func:`train_dataset`'s batches.

    Args are those of :func:`train_dataset`, plus ``read_options``
    (default :func:`default_read_options`). The iterator's ``get_state()`` is
    JSON-serializable; ``set_state`` on a fresh iterator of the same pipeline
    resumes with exactly the batches the first one would have produced.

    Example (a language model's windows)::

        def shift(batch):  # tokens, mask [B, L + 1] -> inputs, targets, mask [B, L]
            return jaxkd.lm.shift_tokens(batch["tokens"], batch["mask"])

        iterator = train_iterator(windows, global_batch_size=32, seed=0,
                                  keys=("tokens", "mask"), transform=shift)
    """
    dataset = train_dataset(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        keys=keys,
        transform=transform,
        process_index=process_index,
        process_count=process_count,
    )
    return iter(dataset.to_iter_dataset(read_options or default_read_options(source)))


class TrainLoader(grain.DatasetIterator):
    """Infinite iterator over shuffled classification batches; a Grain ``DatasetIterator``.

    ``next(loader)`` returns this process's slice of the next global batch:
    ``{"image": float32 [B_local, ...], "label": int32 [B_local]}`` with
    ``B_local = global_batch_size // process_count``. ``get_state`` and
    ``set_state`` are Grain's, so ``grain.checkpoint.CheckpointSave(loader)``
    checkpoints it.

    Example::

        loader = TrainLoader(arrays, global_batch_size=128, seed=0)
        batch = next(loader)
        state = loader.get_state()
        ...
        loader = TrainLoader(arrays, global_batch_size=128, seed=0)
        loader.set_state(state)  # the same batches as the first loader from here

    Args:
        source: arrays ``{image_key: [N, ...], label_key: [N]}`` or a
            random-access source of example dicts.
        global_batch_size: batch size summed over all processes.
        seed: non-negative integer; with the epoch it fixes the order.
        image_key: key of the inputs in the source.
        label_key: key of the integer labels in the source.
        normalize: maps raw inputs [K, ...] to float32 [K, ...].
        process_index: this process, default ``jax.process_index()``.
        process_count: number of processes, default ``jax.process_count()``.
        read_options: Grain's threads and prefetch; default :func:`default_read_options`.
        augmentation: optional random crop, flip and mixup of ``image``, drawn per
            ``(seed, step)`` (:mod:`experiments.data.augment`); when not
            ``consistent``, the batch also holds the teacher's own view
            ``teacher_image`` float32 [B_local, ...].
        with_index: also yield each example's index in ``source`` as ``index`` int32
            [B_local] (what a memory bank of the training set is indexed by).

    Attributes:
        dataset: the pipeline, a ``grain.MapDataset``: ``dataset[k]`` is the batch
            ``next`` returns at step k of an uninterrupted run.
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch_size: int,
        seed: int,
        image_key: str = "image",
        label_key: str = "label",
        normalize: Normalize = to_float32,
        process_index: int | None = None,
        process_count: int | None = None,
        read_options: grain.ReadOptions | None = None,
        augmentation: Augmentation | None = None,
        with_index: bool = False,
    ):
        to_batch = ClassificationBatch(image_key, label_key, normalize)
        self._indices = GlobalBatchIndices(
            num_examples(source, label_key=label_key),
            global_batch_size=global_batch_size,
            seed=seed,
        )
        local = _resolve_slice(global_batch_size, process_index, process_count)
        self.dataset = _pipeline(
            source,
            self._indices,
            local,
            keys=to_batch.keys,
            transform=to_batch,
            augmentation=augmentation,
            with_index=with_index,
        )
        read_options = read_options or default_read_options(source)
        super().__init__(iter(self.dataset.to_iter_dataset(read_options)))

    @property
    def num_examples(self) -> int:
        """Number of examples N in the split."""
        return self._indices.num_examples

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch, ``N // global_batch_size``."""
        return self._indices.batches_per_epoch

    def global_indices(self, epoch: int, index_in_epoch: int) -> np.ndarray:
        """Example indices int64 [global_batch_size] of one global batch."""
        return self._indices(epoch * self.batches_per_epoch + index_in_epoch)

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        """Grain's iterator state: JSON-serializable, for ``set_state``."""
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from a state returned by ``get_state`` of the same pipeline."""
        self._parent.set_state(state)

    def close(self) -> None:
        """Stops the prefetching threads, if any; ``__next__`` raises afterwards."""
        if "_parents" in vars(self):  # Absent when __init__ raised before Grain's ran.
            super().close()


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Global eval batches covering ``num_examples``, the last one padded."""
    return -(-num_examples // global_batch_size)


def padded_batches(
    source: Source,
    *,
    global_batch_size: int,
    keys: Sequence[str],
    transform: Transform | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Yields a whole split once, in stored order, with a padded last batch.

    Every process yields ``num_eval_batches(N, global_batch_size)`` batches, its
    slice of each global batch: the features ``keys`` read (or ``transform``'s
    batch), each [B_local, ...] with zeros in padded rows, and ``mask`` bool
    [B_local], True for real examples.
    """
    local = _resolve_slice(global_batch_size, process_index, process_count)
    total = num_examples(source)
    for batch_index in range(num_eval_batches(total, global_batch_size)):
        positions = np.arange(global_batch_size)[local] + batch_index * global_batch_size
        mask = positions < total
        batch = read(source, np.where(mask, positions, 0), keys=keys)
        if transform is not None:
            batch = transform(batch)
        batch = {key: _zero_where_padded(value, mask) for key, value in batch.items()}
        batch["mask"] = mask
        yield batch


def eval_batches(
    source: Source,
    *,
    global_batch_size: int,
    image_key: str = "image",
    label_key: str = "label",
    normalize: Normalize = to_float32,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Yields a classification split once, in fixed order, with a padded last batch.

    Every process yields the same number of batches,
    ``num_eval_batches(N, global_batch_size)``; each is that process's slice of
    the global batch: ``image`` float32 [B_local, ...], ``label`` int32
    [B_local] and ``mask`` bool [B_local], True for real examples. Padded rows
    hold zeros, so summing a per-example metric under ``mask`` counts every
    example of the split exactly once.

    Args:
        source: arrays or a random-access source, as for ``TrainLoader``.
        global_batch_size: batch size summed over all processes.
        image_key: key of the inputs in the source.
        label_key: key of the integer labels in the source.
        normalize: maps raw inputs [K, ...] to float32 [K, ...].
        process_index: this process, default ``jax.process_index()``.
        process_count: number of processes, default ``jax.process_count()``.

    Yields:
        Batches ``{"image", "label", "mask"}``.
    """
    num_examples(source, label_key=label_key)  # Names a missing label array.
    to_batch = ClassificationBatch(image_key, label_key, normalize)
    return padded_batches(
        source,
        global_batch_size=global_batch_size,
        keys=to_batch.keys,
        transform=to_batch,
        process_index=process_index,
        process_count=process_count,
    )


def _zero_where_padded(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zeros rows of ``values`` [K, ...] where ``mask`` [K] is False."""
    keep = mask.reshape(mask.shape + (1,) * (values.ndim - 1))
    return np.where(keep, values, np.zeros((), values.dtype))
