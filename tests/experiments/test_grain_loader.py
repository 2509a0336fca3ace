"""Tests of the Grain training pipeline: order, process slices, resumption, checkpoints."""

import json

import grain
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxkd
from experiments import data
from experiments.checkpointing import RunCheckpointer, _to_storable
from experiments.data.loader import (
    SOURCE_READ_OPTIONS,
    epoch_permutation,
    padded_batches,
    train_dataset,
    train_iterator,
)

WINDOW = 6  # A language-model window: L = 6 targets, L + 1 tokens.
SERIAL = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _ids(num_examples):
    """Arrays whose only feature is the example's index."""
    return {"id": np.arange(num_examples)}


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_batches_equal(batches, expected):
    assert len(batches) == len(expected)
    for batch, reference in zip(batches, expected, strict=True):
        assert batch.keys() == reference.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], reference[key])


def _iterator(source, **kwargs):
    """A train iterator, by default over ``id``, on one process, read without threads."""
    defaults = {"global_batch_size": 8, "seed": 0, "keys": ("id",), "process_index": 0}
    defaults.update(process_count=1, read_options=SERIAL)
    return train_iterator(source, **{**defaults, **kwargs})


class _Windows:
    """A random-access source of LM windows, with a batched ``__getitems__``.

    Window ``i`` holds tokens ``100 * i + [0, L]``; its last ``i % 3`` tokens are
    masked out.
    """

    def __init__(self, num_windows):
        self.num_windows = num_windows
        self.batched_reads = 0

    def __len__(self):
        return self.num_windows

    def __getitem__(self, index):
        tokens = (100 * index + np.arange(WINDOW + 1)).astype(np.int32)
        mask = np.arange(WINDOW + 1) < WINDOW + 1 - index % 3
        return {"tokens": tokens, "mask": mask}

    def __getitems__(self, indices):
        self.batched_reads += 1
        return [self[index] for index in indices]


def _shift(batch):
    """Windows ``tokens``, ``mask`` [B, L + 1] to next-token inputs and targets [B, L]."""
    tokens, mask = batch["tokens"], batch["mask"]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": mask[:, 1:]}


# Order.


@pytest.mark.parametrize("seed", [0, 7])
def test_each_epoch_is_the_permutation_of_its_seed_and_epoch(seed):
    iterator = _iterator(_ids(48), seed=seed)  # 6 batches of 8 per epoch.
    epochs = [np.concatenate([b["id"] for b in _take(iterator, 6)]) for _ in range(3)]
    for epoch, order in enumerate(epochs):
        np.testing.assert_array_equal(np.sort(order), np.arange(48))
        np.testing.assert_array_equal(order, epoch_permutation(48, seed=seed, epoch=epoch))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    again = np.concatenate([b["id"] for b in _take(_iterator(_ids(48), seed=seed), 6)])
    np.testing.assert_array_equal(again, epochs[0])
    other_seed = np.concatenate([b["id"] for b in _take(_iterator(_ids(48), seed=seed + 1), 6)])
    assert not np.array_equal(other_seed, epochs[0])


def test_each_epoch_drops_its_remainder():
    iterator = _iterator(_ids(50), seed=1)  # 6 batches of 8; 2 examples dropped per epoch.
    for epoch in range(2):
        order = np.concatenate([b["id"] for b in _take(iterator, 6)])
        np.testing.assert_array_equal(order, epoch_permutation(50, seed=1, epoch=epoch)[:48])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="exceeds the number of examples"):
        _iterator(_ids(5))
    with pytest.raises(ValueError, match="seed"):
        _iterator(_ids(50), seed=-1)
    with pytest.raises(ValueError, match="global_batch_size=10 .* process_count=4"):
        _iterator(_ids(50), global_batch_size=10, process_count=4)


# Processes.


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    source = _Windows(40)
    kwargs = {"global_batch_size": 8, "seed": 3, "keys": ("tokens", "mask"), "transform": _shift}
    global_batches = _take(_iterator(source, **kwargs), 12)  # Over two epochs.
    local = [
        _take(_iterator(source, **kwargs, process_index=p, process_count=process_count), 12)
        for p in range(process_count)
    ]
    assert local[0][0]["inputs"].shape == (8 // process_count, WINDOW)
    for step, global_batch in enumerate(global_batches):
        joined = {
            key: np.concatenate([local[p][step][key] for p in range(process_count)])
            for key in global_batch
        }
        _assert_batches_equal([joined], [global_batch])


# Resumption.


@pytest.mark.parametrize("consumed", [0, 1, 5, 6, 7, 13])
def test_set_state_on_a_fresh_iterator_continues_exactly(consumed):
    uninterrupted = _take(_iterator(_ids(50), seed=11), consumed + 9)
    interrupted = _iterator(_ids(50), seed=11)
    _take(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = _iterator(_ids(50), seed=11)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 9), uninterrupted[consumed:])


def test_prefetching_threads_keep_the_order_and_the_state():
    kwargs = {"seed": 2, "keys": ("tokens", "mask"), "transform": _shift}
    serial = _take(_iterator(_Windows(30), **kwargs), 12)
    threaded = _iterator(_Windows(30), **kwargs, read_options=SOURCE_READ_OPTIONS)
    _assert_batches_equal(_take(threaded, 5), serial[:5])
    state = threaded.get_state()
    resumed = _iterator(_Windows(30), **kwargs, read_options=SOURCE_READ_OPTIONS)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 7), serial[5:])
    threaded.close()
    resumed.close()


def _train_state(value):
    params = {"w": np.full(3, value, np.float32)}
    return jaxkd.TrainState.create(params=params, optimizer=optax.sgd(0.1), model_state={}, rng=0)


def test_run_checkpointer_restores_the_iterator_exactly(tmp_path):
    kwargs = {"global_batch_size": 8, "seed": 4, "process_index": 0, "process_count": 1}
    arrays = {"image": np.arange(50, dtype=np.float32)[:, None], "label": np.arange(50) % 10}
    uninterrupted = _take(data.TrainLoader(arrays, **kwargs), 20)
    loader = data.TrainLoader(arrays, **kwargs)
    assert isinstance(loader, grain.DatasetIterator)
    _take(loader, 9)
    checkpointer = RunCheckpointer(tmp_path)
    assert checkpointer.restore(_train_state(0.0), loader) is None
    checkpointer.save(9, _train_state(2.5), loader, {"elapsed": 1.25})
    _take(loader, 3)  # Moves on after the save: the checkpoint keeps step 9's position.
    checkpointer.close()

    fresh = data.TrainLoader(arrays, **kwargs)
    checkpointer = RunCheckpointer(tmp_path)
    state, restored, extra = checkpointer.restore(_train_state(0.0), fresh)
    checkpointer.close()
    assert restored is fresh
    assert extra == {"elapsed": 1.25}
    np.testing.assert_array_equal(state.params["w"], np.full(3, 2.5, np.float32))
    _assert_batches_equal(_take(restored, 11), uninterrupted[9:])


def test_checkpoint_of_the_loader_before_grain_restores_its_position(tmp_path):
    """A checkpoint with the older JSON position and no iterator item still restores."""
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
    position = {"epoch": 1, "index_in_epoch": 2}
    manager.save(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_storable(_train_state(1.5))),
            extra=ocp.args.JsonSave({"loader": position, "elapsed": 0.5}),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    checkpointer = RunCheckpointer(tmp_path)
    iterator = _iterator(_ids(50))
    state, restored, extra = checkpointer.restore(_train_state(0.0), iterator)
    checkpointer.close()
    np.testing.assert_array_equal(state.params["w"], np.full(3, 1.5, np.float32))
    assert restored is iterator and iterator.get_state() == _iterator(_ids(50)).get_state()
    assert extra == {"loader": position, "elapsed": 0.5}


# Language-model windows.


def test_lm_windows_with_a_transform():
    source = _Windows(20)
    iterator = _iterator(source, seed=5, keys=("tokens", "mask"), transform=_shift)
    batches = _take(iterator, 2)  # One epoch: 2 batches of 8, 4 windows dropped.
    assert source.batched_reads == 2  # One read per batch.
    batch = batches[0]
    assert set(batch) == {"inputs", "targets", "weights"}
    assert batch["inputs"].shape == batch["targets"].shape == (8, WINDOW)
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.bool_
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    windows = np.concatenate([b["inputs"][:, 0] // 100 for b in batches])
    np.testing.assert_array_equal(windows, epoch_permutation(20, seed=5, epoch=0)[:16])
    np.testing.assert_array_equal(
        batch["weights"].sum(1), WINDOW - batch["inputs"][:, 0] // 100 % 3
    )


def test_train_dataset_is_indexed_by_step():
    kwargs = {"global_batch_size": 8, "seed": 6, "process_index": 1, "process_count": 2}
    dataset = train_dataset(_ids(30), keys=("id",), **kwargs)
    assert isinstance(dataset, grain.MapDataset)
    iterator = _iterator(_ids(30), **kwargs)
    _assert_batches_equal([dataset[step] for step in range(9)], _take(iterator, 9))


def test_padded_lm_windows_count_each_window_once():
    per_process = [
        list(
            padded_batches(
                _Windows(11),
                global_batch_size=8,
                keys=("tokens", "mask"),
                transform=_shift,
                process_index=p,
                process_count=2,
            )
        )
        for p in range(2)
    ]
    assert [len(batches) for batches in per_process] == [2, 2]
    rows = [
        per_process[p][step] for step in range(2) for p in range(2)
    ]  # Global order: step, then process.
    mask = np.concatenate([row["mask"] for row in rows])
    inputs = np.concatenate([row["inputs"] for row in rows])
    assert mask.sum() == 11 and not mask[11:].any()
    np.testing.assert_array_equal(inputs[mask][:, 0] // 100, np.arange(11))
    assert not inputs[~mask].any()
