"""Tests of the experiments data layer: offline builders, registry, splits and loaders."""

import json
import os
import random

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import data, jsonfiles
from experiments.data import builders
from experiments.data.loader import epoch_permutation, gather, num_eval_batches
from experiments.errors import ExperimentError

# Small enough to build in about a second: 800 train / 200 test examples.
MNIST1D_SAMPLES = 1000


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir holding digits and a small mnist1d, built once per session."""
    directory = tmp_path_factory.mktemp("tfds")
    data.prepare("digits", directory)
    data.prepare("mnist1d", directory, num_samples=MNIST1D_SAMPLES)
    return directory


@pytest.fixture(scope="session")
def digits_train(data_dir):
    return data.load_split("digits", "train", data_dir)


def _read_all(source, keys):
    examples = source.__getitems__(list(range(len(source))))
    return {key: np.stack([np.asarray(example[key]) for example in examples]) for key in keys}


def _sorted_rows(*columns):
    """Rows of the flattened columns, lexicographically sorted (order-free comparison)."""
    table = np.concatenate([np.reshape(c, (len(c), -1)).astype(np.float64) for c in columns], 1)
    return table[np.lexsort(table.T[::-1])]


# Offline builders.


def test_digits_reads_back_through_tfds_data_source(data_dir):
    from sklearn.datasets import load_digits

    train = tfds.data_source("digits", split="train", data_dir=os.fspath(data_dir))
    test = tfds.data_source("digits", split="test", data_dir=os.fspath(data_dir))
    assert (len(train), len(test)) == (1437, 360)
    example = train[0]
    assert example["image"].shape == (8, 8, 1)
    assert example["image"].dtype == np.uint8
    both = {
        key: np.concatenate([_read_all(split, [key])[key] for split in (train, test)])
        for key in ("image", "label")
    }
    assert both["image"].max() <= 16
    assert set(np.unique(both["label"])) == set(range(10))
    # Train and test together are exactly scikit-learn's 1797 examples.
    reference = load_digits()
    np.testing.assert_array_equal(
        _sorted_rows(both["image"], both["label"]),
        _sorted_rows(reference.images, reference.target),
    )


def test_mnist1d_reads_back_through_tfds_data_source(data_dir):
    name = f"mnist1d/n{MNIST1D_SAMPLES}"
    train = tfds.data_source(name, split="train", data_dir=os.fspath(data_dir))
    test = tfds.data_source(name, split="test", data_dir=os.fspath(data_dir))
    assert (len(train), len(test)) == (800, 200)
    arrays = _read_all(train, ["x", "label"])
    assert arrays["x"].shape == (800, 40)
    assert arrays["x"].dtype == np.float32
    assert arrays["label"].min() >= 0 and arrays["label"].max() < 10
    # Same examples as the generator's train split (the file order is TFDS's).
    generated = builders.generate_mnist1d(MNIST1D_SAMPLES)
    np.testing.assert_array_equal(
        _sorted_rows(arrays["x"], arrays["label"]),
        _sorted_rows(generated["x"].astype(np.float32), generated["y"]),
    )


def test_prepare_is_idempotent(data_dir):
    files = sorted((data_dir / "digits").rglob("*.array_record*"))
    assert len(files) == 2
    before = [file.stat().st_mtime_ns for file in files]
    builder = data.prepare("digits", data_dir)
    assert [file.stat().st_mtime_ns for file in files] == before
    assert len(builder.as_data_source(split="test")) == 360


@pytest.mark.parametrize(
    ("name", "builder_kwargs", "key"),
    [("digits", {}, "image"), ("mnist1d", {"num_samples": MNIST1D_SAMPLES}, "x")],
)
def test_builds_are_deterministic(data_dir, tmp_path, name, builder_kwargs, key):
    first = data.prepare(name, data_dir, **builder_kwargs).as_data_source(split="train")
    second = data.prepare(name, tmp_path, **builder_kwargs).as_data_source(split="train")
    first, second = _read_all(first, [key, "label"]), _read_all(second, [key, "label"])
    for k in (key, "label"):
        np.testing.assert_array_equal(first[k], second[k])


def test_mnist1d_generation_leaves_global_rng_alone():
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002
    expected = (random.random(), np.random.random())  # noqa: NPY002
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002
    builders.generate_mnist1d(20)
    assert (random.random(), np.random.random()) == expected  # noqa: NPY002


@pytest.mark.parametrize("num_samples", [0, -10, 1005, 12.5])
def test_mnist1d_rejects_bad_num_samples(num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        builders.mnist1d_config(num_samples)


def test_mnist1d_config_from_name_or_num_samples(data_dir):
    builder = builders.Mnist1d(config=f"n{MNIST1D_SAMPLES}", data_dir=os.fspath(data_dir))
    assert builder.builder_config.num_samples == MNIST1D_SAMPLES
    assert len(builder.as_data_source(split="test")) == 200
    assert (
        builders.Mnist1d(num_samples=20, data_dir=os.fspath(data_dir)).builder_config.name == "n20"
    )
    assert (
        builders.Mnist1d(data_dir=os.fspath(data_dir)).builder_config.num_samples == 12_500
    )  # 10000 train / 2500 test.
    # Asking for the default count by number selects the registered config.
    default = builders.Mnist1d(num_samples=12_500, data_dir=os.fspath(data_dir))
    assert default.builder_config is builders.Mnist1d.builder_configs["n12500"]
    with pytest.raises(ValueError, match="mnist1d config 'large'"):
        builders.Mnist1d(config="large")
    with pytest.raises(ValueError, match="either num_samples or config"):
        builders.Mnist1d(num_samples=20, config="n20")


def test_prepare_rejects_unknown_offline_dataset(tmp_path):
    with pytest.raises(ValueError, match="digits"):
        data.prepare("mnist", tmp_path)


# Registry.


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'") as error:
        data.get_spec("imagenet")
    for name in ("digits", "mnist1d", "mnist", "fashion_mnist", "cifar10", "cifar100"):
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("name", "builder_kwargs", "size"),
    [("digits", {}, 1437), ("mnist1d", {"num_samples": MNIST1D_SAMPLES}, 800)],
)
def test_load_split_is_normalized(data_dir, name, builder_kwargs, size):
    spec = data.get_spec(name)
    arrays = data.load_split(name, spec.train_split, data_dir, **builder_kwargs)
    assert arrays["image"].shape == (size, *spec.input_shape)
    assert arrays["image"].dtype == np.float32
    assert arrays["label"].dtype == np.int32
    assert 0 <= arrays["label"].min() and arrays["label"].max() < spec.num_classes
    if name == "digits":
        assert arrays["image"].min() == 0.0 and arrays["image"].max() == 1.0
    else:  # Standardized by the generator.
        assert abs(arrays["image"].mean()) < 0.1 and abs(arrays["image"].std() - 1) < 0.1


# Training loader.


def _take(loader, count):
    return [next(loader) for _ in range(count)]


def _assert_batches_equal(batches, expected):
    assert len(batches) == len(expected)
    for batch, reference in zip(batches, expected, strict=True):
        assert batch.keys() == reference.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], reference[key])


def _arrays(num_examples):
    """Arrays whose image identifies the example: image[i] = [i, -i], label[i] = i % 10."""
    index = np.arange(num_examples)
    return {"image": np.stack([index, -index], 1).astype(np.float32), "label": index % 10}


def test_train_batches_are_deterministic_and_cover_each_epoch(digits_train):
    kwargs = {"global_batch_size": 64, "seed": 3, "process_index": 0, "process_count": 1}
    loader = data.TrainLoader(digits_train, **kwargs)
    assert loader.batches_per_epoch == 1437 // 64
    batches = _take(loader, 2 * loader.batches_per_epoch)
    _assert_batches_equal(batches, _take(data.TrainLoader(digits_train, **kwargs), len(batches)))
    assert batches[0]["image"].shape == (64, 8, 8, 1)
    assert batches[0]["image"].dtype == np.float32
    assert batches[0]["label"].dtype == np.int32
    other_seed = next(data.TrainLoader(digits_train, **{**kwargs, "seed": 4}))
    assert not np.array_equal(other_seed["image"], batches[0]["image"])
    # Within an epoch no example repeats; the remainder is dropped; epochs differ.
    for epoch in range(2):
        indices = np.concatenate(
            [loader.global_indices(epoch, i) for i in range(loader.batches_per_epoch)]
        )
        assert len(np.unique(indices)) == len(indices) == 22 * 64
    assert not np.array_equal(loader.global_indices(0, 0), loader.global_indices(1, 0))


def test_train_loader_reads_the_right_examples():
    arrays = _arrays(50)
    loader = data.TrainLoader(arrays, global_batch_size=8, seed=0, process_count=1, process_index=0)
    batch = next(loader)
    indices = epoch_permutation(50, seed=0, epoch=0)[:8]
    np.testing.assert_array_equal(batch["image"][:, 0], indices)
    np.testing.assert_array_equal(batch["label"], indices % 10)


@pytest.mark.parametrize("consumed", [0, 1, 5, 6, 7, 13])
def test_resumed_loader_continues_exactly(consumed):
    arrays = _arrays(50)  # 6 batches of 8 per epoch.
    kwargs = {"global_batch_size": 8, "seed": 11, "process_index": 0, "process_count": 1}
    uninterrupted = _take(data.TrainLoader(arrays, **kwargs), consumed + 9)
    interrupted = data.TrainLoader(arrays, **kwargs)
    _take(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.get_state()))  # As a checkpoint stores it.
    resumed = data.TrainLoader(arrays, **kwargs)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 9), uninterrupted[consumed:])


def test_loader_dataset_is_indexed_by_step():
    arrays = _arrays(50)
    loader = data.TrainLoader(arrays, global_batch_size=8, seed=2, process_index=0, process_count=1)
    for step, batch in enumerate(_take(loader, 14)):
        _assert_batches_equal([loader.dataset[step]], [batch])
        np.testing.assert_array_equal(
            batch["image"][:, 0], loader.global_indices(step // 6, step % 6)
        )


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    arrays = _arrays(100)
    kwargs = {"global_batch_size": 16, "seed": 5}
    global_batches = _take(data.TrainLoader(arrays, **kwargs, process_index=0, process_count=1), 9)
    local = [
        _take(data.TrainLoader(arrays, **kwargs, process_index=p, process_count=process_count), 9)
        for p in range(process_count)
    ]
    assert local[0][0]["image"].shape == (16 // process_count, 2)
    for step, global_batch in enumerate(global_batches):
        for key in ("image", "label"):
            joined = np.concatenate([local[p][step][key] for p in range(process_count)])
            np.testing.assert_array_equal(joined, global_batch[key])


def test_process_count_must_divide_the_global_batch():
    with pytest.raises(ValueError, match="global_batch_size=10 .* process_count=4"):
        data.TrainLoader(
            _arrays(50), global_batch_size=10, seed=0, process_count=4, process_index=0
        )
    with pytest.raises(ValueError, match="process_index"):
        data.TrainLoader(_arrays(50), global_batch_size=8, seed=0, process_count=2, process_index=2)


def test_random_access_source_matches_in_memory_arrays(data_dir):
    spec = data.get_spec("digits")
    source = data.load_source("digits", "train", data_dir)
    kwargs = {"global_batch_size": 32, "seed": 1, "process_index": 1, "process_count": 2}
    from_source = data.TrainLoader(
        source, image_key=spec.image_key, normalize=spec.normalize, **kwargs
    )
    from_arrays = data.TrainLoader(data.read_arrays(source, spec), **kwargs)
    _assert_batches_equal(_take(from_source, 3), _take(from_arrays, 3))


# Evaluation batches.


def _collect_eval(arrays, global_batch_size, process_count):
    """Per-process lists of eval batches."""
    return [
        list(
            data.eval_batches(
                arrays,
                global_batch_size=global_batch_size,
                process_index=p,
                process_count=process_count,
            )
        )
        for p in range(process_count)
    ]


def test_eval_batches_cover_each_example_once(data_dir):
    arrays = data.load_split("digits", "test", data_dir)  # 360 examples.
    batches = _collect_eval(arrays, 64, 1)[0]
    assert len(batches) == num_eval_batches(360, 64) == 6
    assert all(batch["image"].shape == (64, 8, 8, 1) for batch in batches)
    mask = np.concatenate([batch["mask"] for batch in batches])
    assert mask.dtype == np.bool_ and mask.sum() == 360 and not mask[360:].any()
    images = np.concatenate([batch["image"] for batch in batches])
    np.testing.assert_array_equal(images[mask], arrays["image"])
    assert not images[~mask].any()
    labels = np.concatenate([batch["label"] for batch in batches])
    np.testing.assert_array_equal(labels[mask], arrays["label"])


@settings(max_examples=40, deadline=None)
@given(
    num=st.integers(1, 70),
    local_batch_size=st.integers(1, 9),
    process_count=st.sampled_from([1, 2, 4]),
)
def test_sharded_eval_counts_every_example_once(num, local_batch_size, process_count):
    arrays = _arrays(num)
    global_batch_size = local_batch_size * process_count
    per_process = _collect_eval(arrays, global_batch_size, process_count)
    assert {len(batches) for batches in per_process} == {-(-num // global_batch_size)}
    seen = [
        per_process[p][step]["image"][per_process[p][step]["mask"], 0]
        for step in range(len(per_process[0]))
        for p in range(process_count)
    ]
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(num))


# Real datasets, mocked: TFDS's random examples instead of a download.
# `tfds.testing.mock_data` works without TensorFlow for `tfds.data_source` with
# the default policy AUTO (which falls back to USE_CODE: the wheel ships no
# metadata files) or USE_CODE; USE_FILES fails for the same missing metadata.


@pytest.mark.parametrize(
    ("name", "shape", "num_classes", "policy"),
    [
        ("mnist", (28, 28, 1), 10, tfds.testing.MockPolicy.AUTO),
        ("cifar10", (32, 32, 3), 10, tfds.testing.MockPolicy.USE_CODE),
        ("cifar100", (32, 32, 3), 100, tfds.testing.MockPolicy.USE_CODE),
    ],
)
def test_real_datasets_through_mock_data(tmp_path, name, shape, num_classes, policy):
    with tfds.testing.mock_data(num_examples=20, policy=policy):
        train = data.load_split(name, "train", tmp_path)
        test = data.load_split(name, "test", tmp_path)
    train_loader = data.TrainLoader(
        train, global_batch_size=8, seed=0, process_index=0, process_count=1
    )
    batch = next(train_loader)
    eval_batches = list(
        data.eval_batches(test, global_batch_size=8, process_index=0, process_count=1)
    )
    assert data.get_spec(name).input_shape == shape
    assert train_loader.num_examples == 20
    assert batch["image"].shape == (8, *shape)
    assert batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < num_classes
    assert len(eval_batches) == 3
    assert sum(int(b["mask"].sum()) for b in eval_batches) == 20


# Validation split and label checks.


@pytest.mark.parametrize(
    "num_examples, fraction, size", [(1437, 0.1, 144), (10, 0.01, 1), (50, 0.0, 0)]
)
def test_validation_split_is_disjoint_deterministic_and_complete(num_examples, fraction, size):
    train, validation = data.validation_split(num_examples, fraction=fraction, seed=0)
    assert len(validation) == size
    assert not set(train) & set(validation)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train, validation])), np.arange(num_examples)
    )
    again = data.validation_split(num_examples, fraction=fraction, seed=0)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], validation)


def test_validation_split_depends_on_its_seed_and_is_not_a_prefix_or_suffix():
    _, first = data.validation_split(1000, fraction=0.1, seed=0)
    _, second = data.validation_split(1000, fraction=0.1, seed=1)
    assert not np.array_equal(first, second)
    assert first.min() < 100 and first.max() >= 900  # spread over the split, not its tail


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 0.999])
def test_validation_split_rejects_fractions_that_leave_nothing(fraction):
    with pytest.raises(ExperimentError, match="validation_fraction"):
        data.validation_split(10, fraction=fraction, seed=0)


def test_labels_outside_the_classes_are_named():
    data.check_labels(np.array([0, 9, 3]), 10, split="digits/train")
    with pytest.raises(
        ExperimentError, match=r"'digits/test' split has 3 labels outside \[0, 10\): -2, 10\."
    ):
        data.check_labels(np.array([0, -2, 10, 10, 4]), 10, split="digits/test")


def test_example_without_the_label_key_is_named():
    source = [{"image": np.zeros((8, 8, 1)), "target": 3}] * 4
    with pytest.raises(
        ExperimentError, match=r"Example 1 of the source has no 'label' feature .*'target'"
    ):
        gather(source, np.array([1, 2]))
    with pytest.raises(ExperimentError, match="label_key 'label' is not in the source keys"):
        data.TrainLoader({"image": np.zeros((4, 2)), "y": np.zeros(4)}, global_batch_size=2, seed=0)


def test_json_files_are_strict():
    value = {"a": float("nan"), "b": [np.float32(np.inf), (1, np.int64(2))], "c": np.arange(2.0)}
    assert jsonfiles.strict(value) == {"a": None, "b": [None, [1, 2]], "c": [0.0, 1.0]}
    text = jsonfiles.dumps(value)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) == {
        "a": None,
        "b": [None, [1, 2]],
        "c": [0.0, 1.0],
    }
