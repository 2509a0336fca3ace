"""Token windows for causal language models, as random-access sources.

A split becomes one int32 token stream (:func:`tokenize_split`: each
document's ids, then ``eos_id``), cut into windows of ``length + 1`` tokens so
that a consumer can shift them into inputs ``tokens[:-1]`` and targets
``tokens[1:]`` (``jaxkd.lm.shift_tokens`` does; nothing here shifts):

* :class:`PackedWindows` for training: consecutive, non-overlapping windows;
  the tail that does not fill a window is dropped. Every mask is all True.
* :class:`PaddedWindows` for evaluation: window ``k`` is
  ``stream[k * length : k * length + length + 1]``, so consecutive windows
  share one token (the last of one is the first of the next). Every token but
  the stream's first is then a target exactly once over all windows; the
  first has no context and is never one. The last window is padded with
  ``pad_id``, and ``mask`` is False on padding, so ``mask[1:]`` marks the
  targets to count.

Both are sequences of ``{"tokens": int32 [length + 1], "mask": bool [length + 1]}``
usable by ``grain.MapDataset.source``::

    stream = token_stream("train", data_dir=data_dir, config="small",
                          tokenizer=tokenizer, cache_dir=cache_dir)
    dataset = grain.MapDataset.source(PackedWindows(stream, length=256)).shuffle(seed=0)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from experiments.data.tokenizer import Tokenizer

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def tokenize_split(
    documents: Sequence[str] | Callable[[], Sequence[str]],
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    dataset_fingerprint: str | None = None,
    split: str | None = None,
) -> np.ndarray:
    """One token stream of a split: each document's ids followed by ``eos_id``.

    With ``cache_dir``, the stream is kept in
    ``<cache_dir>/<dataset_fingerprint>/<split>/<tokenizer.fingerprint>.npy``
    (written atomically) and read from there by later calls, which then
    neither tokenize nor call ``documents``.

    Args:
        documents: the texts, in order, or a function returning them (called
            only when the cache misses).
        tokenizer: any :class:`~experiments.data.tokenizer.Tokenizer`.
        cache_dir: where streams are kept; None to always tokenize.
        dataset_fingerprint: names the corpus (needed with ``cache_dir``).
        split: names the split (needed with ``cache_dir``).

    Returns:
        int32 [num_tokens]: the concatenated ids, ``num_tokens = sum(len(ids) + 1)``.

    Raises:
        ValueError: if ``cache_dir`` comes without a fingerprint or split, or
            either is not a plain name (letters, digits, ``_ . -``).
    """
    path = None
    if cache_dir is not None:
        for name, value in (("dataset_fingerprint", dataset_fingerprint), ("split", split)):
            if value is None or not _SAFE_NAME.fullmatch(value):
                raise ValueError(
                    f"With cache_dir, {name} must be letters, digits, '_', '.' or '-', "
                    f"got {value!r}."
                )
        directory = os.path.join(os.fspath(cache_dir), dataset_fingerprint, split)
        path = os.path.join(directory, f"{tokenizer.fingerprint}.npy")
        if os.path.exists(path):
            return np.load(path)
    if callable(documents):
        documents = documents()
    ids_per_document = tokenizer.encode_batch(list(documents))
    eos = np.array([tokenizer.eos_id], np.int32)
    pieces = [part for ids in ids_per_document for part in (np.asarray(ids, np.int32), eos)]
    stream = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
    if path is not None:
        os.makedirs(directory, exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        with open(partial, "wb") as f:
            np.save(f, stream)
        os.replace(partial, path)
    return stream


def token_stream(
    split: str,
    *,
    data_dir: str | os.PathLike | None,
    config: str,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """:func:`tokenize_split` of a prepared ``python_stdlib_source`` split.

    Documents are in the order of their paths; the cache is keyed by the
    corpus fingerprint from the dataset's metadata.
    """
    from experiments.data import text

    fingerprint = text.corpus_metadata(data_dir, config=config)["fingerprint"]
    return tokenize_split(
        lambda: text.read_documents(split, data_dir=data_dir, config=config),
        tokenizer,
        cache_dir=cache_dir,
        dataset_fingerprint=fingerprint,
        split=split,
    )


def _check_stream(stream: np.ndarray) -> np.ndarray:
    stream = np.asarray(stream)
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(
            f"stream must be a 1-D integer array, got shape {stream.shape} and "
            f"dtype {stream.dtype}."
        )
    return stream.astype(np.int32, copy=False)


def _check_length(length: int) -> int:
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
        raise ValueError(f"length must be an int of at least 1, got {length!r}.")
    return int(length)


def _check_index(index: int, size: int) -> int:
    if not isinstance(index, int | np.integer) or isinstance(index, bool):
        raise TypeError(f"index must be an int, got {type(index).__name__}.")
    if not -size <= index < size:
        raise IndexError(f"index {index} out of range for {size} windows.")
    return int(index) % size


class PackedWindows:
    """Non-overlapping windows of ``length + 1`` tokens of a stream, for training.

    Window ``k`` is ``stream[k * (length + 1) : (k + 1) * (length + 1)]``;
    there are ``len(stream) // (length + 1)`` of them and the rest is dropped.

    Args:
        stream: int [num_tokens] token ids.
        length: tokens per window after shifting (each window holds ``length + 1``).

    Raises:
        ValueError: if ``length < 1``, ``stream`` is not 1-D integers, or it is
            shorter than one window.
    """

    def __init__(self, stream: np.ndarray, length: int):
        self.length = _check_length(length)
        self.stream = _check_stream(stream)
        if len(self.stream) < self.length + 1:
            raise ValueError(
                f"stream has {len(self.stream)} tokens, fewer than one window of "
                f"length + 1 = {self.length + 1}."
            )
        self._num_windows = len(self.stream) // (self.length + 1)

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """``{"tokens": int32 [length + 1], "mask": bool [length + 1]}``, mask all True."""
        start = _check_index(index, self._num_windows) * (self.length + 1)
        tokens = self.stream[start : start + self.length + 1].copy()
        return {"tokens": tokens, "mask": np.ones(self.length + 1, np.bool_)}

    def __repr__(self) -> str:
        return f"PackedWindows(num_windows={len(self)}, length={self.length})"


class PaddedWindows:
    """Windows covering a whole stream, one shared token apart, for evaluation.

    Window ``k`` is ``stream[k * length : k * length + length + 1]``, padded
    with ``pad_id`` past the stream's end. Its targets (positions 1 to
    ``length``) are stream tokens ``k * length + 1`` to ``k * length + length``,
    so over the ``ceil((len(stream) - 1) / length)`` windows every token but
    the first is a target exactly once: a sum of ``mask[1:]``-weighted losses
    over all windows is the loss of the whole stream.

    Args:
        stream: int [num_tokens] token ids, at least 2 (one input, one target).
        length: targets per window (each window holds ``length + 1`` tokens).
        pad_id: the id written past the stream's end.

    Raises:
        ValueError: if ``length < 1``, ``stream`` is not 1-D integers, or it
            has fewer than 2 tokens.
    """

    def __init__(self, stream: np.ndarray, length: int, pad_id: int):
        self.length = _check_length(length)
        self.stream = _check_stream(stream)
        if isinstance(pad_id, bool) or not isinstance(pad_id, int | np.integer):
            raise ValueError(f"pad_id must be an int, got {pad_id!r}.")
        self.pad_id = int(pad_id)
        if len(self.stream) < 2:
            raise ValueError(
                f"stream has {len(self.stream)} tokens; at least 2 are needed for one target."
            )
        self._num_windows = -(-(len(self.stream) - 1) // self.length)

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """``{"tokens": int32 [length + 1], "mask": bool [length + 1]}``, mask False on padding."""
        start = _check_index(index, self._num_windows) * self.length
        real = self.stream[start : start + self.length + 1]
        tokens = np.full(self.length + 1, self.pad_id, np.int32)
        tokens[: len(real)] = real
        mask = np.zeros(self.length + 1, np.bool_)
        mask[: len(real)] = True
        return {"tokens": tokens, "mask": mask}

    def __repr__(self) -> str:
        return f"PaddedWindows(num_windows={len(self)}, length={self.length})"
