"""Datasets and loaders for the experiments.

Offline datasets (``digits``, ``mnist1d``) are TFDS builders written as
array_record files; real ones (``mnist``, ``fashion_mnist``, ``cifar10``,
``cifar100``) come from TFDS. All are read with ``tfds.data_source`` and fed by
a deterministic, checkpointable, per-process loader of NumPy batches::

    from experiments import data

    arrays = data.load_split("digits", "train", data_dir)
    train, validation = data.validation_split(len(arrays["label"]), fraction=0.1, seed=0)
    loader = data.TrainLoader(data.take(arrays, train), global_batch_size=64, seed=0)
    batch = next(loader)  # {"image": float32 [64, 8, 8, 1], "label": int32 [64]}
    for batch in data.eval_batches(data.take(arrays, validation), global_batch_size=64):
        ...  # plus "mask": bool [64], False on padding
"""

# ruff: noqa: F401  (the names below are the package's interface)
from experiments.data.builders import prepare
from experiments.data.loader import TrainLoader, eval_batches
from experiments.data.registry import (
    DATASETS,
    DatasetSpec,
    get_spec,
    load_source,
    load_split,
    read_arrays,
)
from experiments.data.splits import check_labels, take, validation_split
