"""Datasets and loaders for the experiments.

Offline datasets (``digits``, ``mnist1d``) are TFDS builders written as
array_record files; real ones (``mnist``, ``fashion_mnist``, ``cifar10``,
``cifar100``) come from TFDS. All are read with ``tfds.data_source`` and fed by
a deterministic, checkpointable, per-process loader of NumPy batches::

    from experiments import data

    loader = data.make_train_loader("digits", data_dir, global_batch_size=64, seed=0)
    batch = next(loader)  # {"image": float32 [64, 8, 8, 1], "label": int32 [64]}
    for batch in data.make_eval_batches("digits", data_dir, global_batch_size=64):
        ...  # plus "mask": bool [64], False on padding
"""

from experiments.data.builders import (
    FILE_FORMAT,
    OFFLINE_BUILDERS,
    Digits,
    Mnist1d,
    Mnist1dConfig,
    generate_mnist1d,
    mnist1d_config,
    prepare,
)
from experiments.data.loader import (
    TrainLoader,
    epoch_permutation,
    eval_batches,
    gather,
    num_eval_batches,
    num_examples,
    process_slice,
    reshape_for_devices,
    to_float32,
)
from experiments.data.registry import (
    DATASETS,
    DatasetSpec,
    get_spec,
    load_source,
    load_split,
    make_eval_batches,
    make_train_loader,
    read_arrays,
)

__all__ = [
    "DATASETS",
    "FILE_FORMAT",
    "OFFLINE_BUILDERS",
    "DatasetSpec",
    "Digits",
    "Mnist1d",
    "Mnist1dConfig",
    "TrainLoader",
    "epoch_permutation",
    "eval_batches",
    "gather",
    "generate_mnist1d",
    "get_spec",
    "load_source",
    "load_split",
    "make_eval_batches",
    "make_train_loader",
    "mnist1d_config",
    "num_eval_batches",
    "num_examples",
    "prepare",
    "process_slice",
    "read_arrays",
    "reshape_for_devices",
    "to_float32",
]
