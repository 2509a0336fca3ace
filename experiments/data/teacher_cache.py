"""A teacher's outputs on a training set, cached on disk: per token or per example.

When the teacher's forward pass dominates a distillation step, its outputs can
be computed once and read back with the data. A cache holds, for record ``i``
(the teacher's outputs on example ``i`` of the training set: a window of ``L``
tokens for a language model, one input for a classifier), either

* the top-``k`` sparse teacher: ``teacher_top_k_log_probs`` [L, k] (log-probs at
  the cache's temperature, stored as float16, bfloat16 or float32),
  ``teacher_top_k_indices`` [L, k] (uint16 when the vocabulary has at most
  65,536 ids, else int32) and ``teacher_top_k_log_tail`` [L] (float32: the log
  of the probability mass outside the top k); or
* the full logits ``teacher_logits`` [L, V] (``k=None``), in the stored dtype.

A classifier's record has no token axis (``seq_len=None``): [k], [k] and [] for
the top-k teacher, or [V] logits, V being the number of classes. With few
classes the full float32 logits are the natural choice: the student then reads
exactly what an online teacher would give it.

Layout of a cache directory::

    manifest.json                              what it holds (below); written last
    records-00000-of-00003.array_record        ArrayRecord shards, records in order

Each record has a fixed byte layout: the fields above in that order, each its
little-endian C-order bytes (``manifest["layout"]`` lists key, dtype and shape).
The manifest records the format version, the fingerprints of the teacher
(:func:`params_fingerprint`), the dataset (e.g. :func:`packed_windows_fingerprint`
or :func:`arrays_fingerprint`) and the tokenizer (None for a classifier), the
vocabulary size (classes), ``k``, dtype, temperature, ``seq_len`` (L, or None),
the number of records, each shard's records and bytes, and the bytes per record
and per token measured from the shard files.

``augmentation_seed`` is the seed of the augmentation the teacher saw (None
without augmentation). A cache holds the teacher's outputs on one view of each
example; a student reading it must see that same view, so a pipeline with random
augmentation must draw example ``i``'s view from this seed (and ``i``) both when
the cache is written and when the student trains, and record the seed here, where
a reader with another seed is refused. Token windows and the classification
datasets of :mod:`experiments.data` are not augmented: their caches record None.

A training pipeline reads record ``i`` with example ``i``: :class:`WithTeacherCache`
wraps a random-access source (token windows), :class:`CachedTeacherLoader` is the
classification ``TrainLoader`` with the records of in-memory examples.

Writing is atomic and resumable (:class:`TeacherCacheWriter`): shards are written
under ``<path>.partial`` and the directory is renamed to ``<path>`` once every
record is in; a writer opened again on the same spec keeps the finished shards.
Reading refuses a cache made for another run::

    cache = TeacherCache.open(path, expect={"teacher_fingerprint": ..., "k": 32})
    batch = cache.read(indices)  # {"teacher_top_k_log_probs": float32 [B, L, k], ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import threading
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_dtypes
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from experiments import jsonfiles
from experiments.data import loader
from experiments.errors import ExperimentError

FORMAT = "jaxkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
TOP_K_KEYS = ("teacher_top_k_log_probs", "teacher_top_k_indices", "teacher_top_k_log_tail")
LOGITS_KEY = "teacher_logits"
# One record per chunk (random access reads one record), zstd-compressed.
WRITER_OPTIONS = "group_size:1"
READER_OPTIONS = "readahead_buffer_size:0"
_SHARD_BYTES = 256 << 20
_SPEC_FILE = "spec.json"


class TeacherCacheError(ExperimentError):
    """A teacher cache that is missing, unfinished, damaged or of an unknown format."""


class CacheMismatchError(TeacherCacheError):
    """A teacher cache made for another teacher, dataset, tokenizer or setting."""


def params_fingerprint(params: Any) -> str:
    """sha256 hex digest of a pytree of arrays: every leaf's path, dtype, shape and bytes.

    Equal for equal values whatever the container types (dict or FrozenDict) and
    wherever the leaves live (host or devices).
    """
    digest = hashlib.sha256(b"params/v1\n")
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        array = np.ascontiguousarray(jax.device_get(leaf))
        header = f"{jax.tree_util.keystr(path)}\t{array.dtype}\t{list(array.shape)}\n"
        digest.update(header.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def packed_windows_fingerprint(windows) -> str:
    """sha256 hex digest of the tokens of every window of an ``lm_data.PackedWindows``."""
    length, count = windows.length, len(windows)
    digest = hashlib.sha256(f"packed-windows/v1 length={length} windows={count}\n".encode())
    digest.update(np.asarray(windows.stream[: count * (length + 1)], "<i4").tobytes())
    return digest.hexdigest()


def arrays_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 hex digest of in-memory examples ``{key: [N, ...]}``, in their order.

    Every array's key, dtype, shape and bytes: equal for the same examples in the
    same order, and different for another dataset, split, subset or order.
    """
    digest = hashlib.sha256(b"arrays/v1\n")
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}\t{array.dtype.str}\t{list(array.shape)}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of a record: batch key, stored dtype name and per-record shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(DTYPES.get(self.dtype, self.dtype)).newbyteorder("<")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.numpy_dtype.itemsize

    @property
    def read_dtype(self) -> type:
        """What :meth:`TeacherCache.read` returns: int32 indices, float32 values."""
        return np.int32 if self.key == TOP_K_KEYS[1] else np.float32


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a cache holds and what it was made from; the fields the reader checks.

    Attributes:
      teacher_fingerprint: :func:`params_fingerprint` of the teacher's params.
      dataset_fingerprint: names the examples and their order, e.g.
        :func:`packed_windows_fingerprint` or :func:`arrays_fingerprint`.
      tokenizer_fingerprint: the tokenizer's ``fingerprint`` (None without one).
      vocab_size: V, the teacher's output size (the number of classes of a classifier).
      k: entries kept per token, in ``[1, V]``; None for the full logits.
      dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``: top-k log-probs or logits.
      temperature: of the top-k log-probs (> 0); None for full logits (stored raw).
      seq_len: L, tokens per record; None for one output per record (a classifier).
      num_records: N, one per example: record ``i`` is example (window) ``i``.
      augmentation_seed: seed of the augmentation the teacher saw, or None.
    """

    teacher_fingerprint: str
    dataset_fingerprint: str
    tokenizer_fingerprint: str | None
    vocab_size: int
    k: int | None
    dtype: str
    temperature: float | None
    seq_len: int | None
    num_records: int
    augmentation_seed: int | None = None

    def __post_init__(self):
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")

        for name in ("vocab_size", "seq_len", "num_records"):
            if name != "seq_len" or self.seq_len is not None:
                positive_int(name, getattr(self, name))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.k is None:
            if self.temperature is not None:
                raise ValueError(
                    f"temperature must be None for full logits (k=None): logits are stored "
                    f"before any temperature, got temperature={self.temperature!r}."
                )
        else:
            positive_int("k", self.k)
            if self.k > self.vocab_size:
                raise ValueError(f"k={self.k} exceeds vocab_size={self.vocab_size}.")
            if not (isinstance(self.temperature, int | float) and self.temperature > 0):
                raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")

    @property
    def index_dtype(self) -> str:
        """``"uint16"`` when every id fits (V <= 65536), else ``"int32"``."""
        return "uint16" if self.vocab_size <= 1 << 16 else "int32"

    @property
    def layout(self) -> tuple[Field, ...]:
        """The fields of a record, in byte order."""
        length = () if self.seq_len is None else (self.seq_len,)
        if self.k is None:
            return (Field(LOGITS_KEY, self.dtype, length + (self.vocab_size,)),)
        top_k = length + (self.k,)
        return (
            Field(TOP_K_KEYS[0], self.dtype, top_k),
            Field(TOP_K_KEYS[1], self.index_dtype, top_k),
            Field(TOP_K_KEYS[2], "float32", length),
        )

    @property
    def record_bytes(self) -> int:
        return sum(field.nbytes for field in self.layout)

    def identity(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (also the ``expect`` of a matching reader)."""
        return jsonfiles.strict(dataclasses.asdict(self))

    def encode(self, arrays: Mapping[str, np.ndarray]) -> list[bytes]:
        """Records of a batch ``{key: [B, *field.shape]}`` (the layout's keys exactly).

        Raises:
          ValueError: for missing or extra keys, a wrong shape, or an index
            outside ``[0, vocab_size)``.
        """
        keys = [field.key for field in self.layout]
        if set(arrays) != set(keys):
            raise ValueError(f"arrays must have the keys {keys}, got {sorted(arrays)}.")
        batch = None
        columns = []
        for field in self.layout:
            array = np.asarray(arrays[field.key])
            if batch is None:
                batch = array.shape[0] if array.ndim else 0
            if array.shape != (batch, *field.shape):
                raise ValueError(
                    f"{field.key} must have shape [B, {', '.join(map(str, field.shape))}] with "
                    f"B={batch}, got {array.shape}."
                )
            if field.key == TOP_K_KEYS[1] and array.size:
                low, high = int(array.min()), int(array.max())
                if low < 0 or high >= self.vocab_size:
                    raise ValueError(
                        f"{field.key} must lie in [0, vocab_size={self.vocab_size}), got ids "
                        f"from {low} to {high}."
                    )
            stored = np.ascontiguousarray(array.astype(field.numpy_dtype))
            columns.append(stored.reshape(batch, -1).view(np.uint8))
        rows = np.concatenate(columns, axis=1) if columns else np.zeros((0, 0), np.uint8)
        return [row.tobytes() for row in rows]

    def decode(self, records: list[bytes]) -> dict[str, np.ndarray]:
        """``{key: [B, *field.shape]}`` of records: float32 values, int32 indices."""
        sizes = sorted({len(record) for record in records} - {self.record_bytes})
        if sizes:
            raise TeacherCacheError(
                f"Records of {sizes} bytes; the layout needs {self.record_bytes} per record."
            )
        buffer = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), -1)
        arrays, offset = {}, 0
        for field in self.layout:
            part = np.ascontiguousarray(buffer[:, offset : offset + field.nbytes])
            values = part.view(field.numpy_dtype).reshape(len(records), *field.shape)
            arrays[field.key] = values.astype(field.read_dtype)
            offset += field.nbytes
        return arrays


def _shard_name(index: int, count: int) -> str:
    return f"records-{index:05d}-of-{count:05d}.array_record"


class TeacherCacheWriter:
    """Writes a cache's records in order, atomically, resuming an unfinished write.

    Records go to ``<path>.partial/``; each shard is renamed into place there once
    full, and :meth:`finish` writes the manifest and renames the directory to
    ``path``. A writer opened on a ``<path>.partial`` made for the same spec and
    shard size keeps its finished shards: continue from record
    :attr:`num_written`. One made for anything else is discarded.

    Args:
      path: the cache directory to create.
      spec: what the cache holds.
      records_per_shard: records in every shard but the last; default about 256 MiB.
    """

    def __init__(self, path: str | os.PathLike, spec: CacheSpec, *, records_per_shard=None):
        self.path = os.fspath(path)
        self.spec = spec
        if records_per_shard is None:
            records_per_shard = max(1, _SHARD_BYTES // spec.record_bytes)
        self.records_per_shard = min(int(records_per_shard), spec.num_records)
        if self.records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard!r}.")
        self.num_shards = -(-spec.num_records // self.records_per_shard)
        self.partial = f"{self.path}.partial"
        started = {
            "spec": spec.identity(),
            "records_per_shard": self.records_per_shard,
            "writer_options": WRITER_OPTIONS,
        }
        if jsonfiles.read(os.path.join(self.partial, _SPEC_FILE)) != started:
            shutil.rmtree(self.partial, ignore_errors=True)
            os.makedirs(self.partial)
            jsonfiles.write(os.path.join(self.partial, _SPEC_FILE), started)
        done = 0
        while done < self.num_shards and os.path.exists(self._shard_path(done)):
            done += 1
        self.num_written = min(done * self.records_per_shard, spec.num_records)
        self._writer = None

    def _shard_path(self, index: int) -> str:
        return os.path.join(self.partial, _shard_name(index, self.num_shards))

    def write(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Appends the records of a batch ``{key: [B, ...]}`` (see :meth:`CacheSpec.encode`)."""
        records = self.spec.encode(arrays)
        if self.num_written + len(records) > self.spec.num_records:
            raise ValueError(
                f"{len(records)} more records would exceed num_records="
                f"{self.spec.num_records} ({self.num_written} written)."
            )
        for record in records:
            shard, position = divmod(self.num_written, self.records_per_shard)
            if self._writer is None:
                self._writer = ArrayRecordWriter(
                    f"{self._shard_path(shard)}.writing", WRITER_OPTIONS
                )
            self._writer.write(record)
            self.num_written += 1
            if position + 1 == self.records_per_shard or self.num_written == self.spec.num_records:
                self._close_shard(shard)

    def _close_shard(self, shard: int) -> None:
        self._writer.close()
        self._writer = None
        os.replace(f"{self._shard_path(shard)}.writing", self._shard_path(shard))

    def close(self) -> None:
        """Stops writing; finished shards stay for a later writer to resume from."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, *, overwrite: bool = False) -> TeacherCache:
        """Writes the manifest, moves the cache to ``path`` and opens it.

        Raises:
          ValueError: if fewer than ``num_records`` records were written.
          FileExistsError: if ``path`` exists and not ``overwrite``.
        """
        self.close()
        if self.num_written != self.spec.num_records:
            raise ValueError(
                f"{self.num_written} of num_records={self.spec.num_records} records written."
            )
        shards = []
        for index in range(self.num_shards):
            first = index * self.records_per_shard
            shards.append(
                {
                    "file": _shard_name(index, self.num_shards),
                    "num_records": min(self.records_per_shard, self.spec.num_records - first),
                    "bytes": os.path.getsize(self._shard_path(index)),
                }
            )
        total = sum(shard["bytes"] for shard in shards)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.spec.identity(),
            "index_dtype": None if self.spec.k is None else self.spec.index_dtype,
            "layout": [dataclasses.asdict(field) for field in self.spec.layout],
            "record_bytes": self.spec.record_bytes,
            "records_per_shard": self.records_per_shard,
            "writer_options": WRITER_OPTIONS,
            "shards": shards,
            "bytes": total,
            "bytes_per_record": total / self.spec.num_records,
            "bytes_per_token": (
                None
                if self.spec.seq_len is None
                else total / (self.spec.num_records * self.spec.seq_len)
            ),
        }
        os.remove(os.path.join(self.partial, _SPEC_FILE))
        jsonfiles.write(os.path.join(self.partial, MANIFEST), manifest)
        if os.path.exists(self.path):
            if not overwrite:
                raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it.")
            old = f"{self.path}.old-{os.getpid()}"
            os.replace(self.path, old)
            os.replace(self.partial, self.path)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.path)
        return TeacherCache.open(self.path)

    def __enter__(self) -> TeacherCacheWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _mismatches(manifest: Mapping[str, Any], expect: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, wanted in expect.items():
        have = manifest.get(name)
        if jsonfiles.strict(wanted) != have:
            line = f"  {name}: the cache has {have!r}, expected {wanted!r}"
            if name == "vocab_size" and "seq_len" in manifest and manifest["seq_len"] is None:
                line += " (the number of classes)"
            lines.append(line)
    return lines


class TeacherCache:
    """A finished cache, read by window index; use :meth:`open`.

    Reads are thread-safe (each thread has its own shard readers), so the cache
    can be read from a Grain pipeline's prefetch threads.
    """

    def __init__(self, path: str, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.spec = CacheSpec(**{f.name: manifest[f.name] for f in dataclasses.fields(CacheSpec)})
        self.records_per_shard = int(manifest["records_per_shard"])
        self._local = threading.local()

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, expect: Mapping[str, Any] | None = None
    ) -> TeacherCache:
        """Opens the cache at ``path``, refusing one that does not match ``expect``.

        Args:
          path: a directory written by :class:`TeacherCacheWriter`.
          expect: values of :class:`CacheSpec` fields the cache must have, e.g.
            ``{"teacher_fingerprint": ..., "k": 32, "temperature": 1.0}``.

        Raises:
          CacheMismatchError: naming every field whose value differs, with both values.
          TeacherCacheError: no manifest, another format or version, missing or
            truncated shards.
          TypeError: ``expect`` names a field that is not a :class:`CacheSpec` field.
        """
        path = os.fspath(path)
        names = [field.name for field in dataclasses.fields(CacheSpec)]
        unknown = sorted(set(expect or {}) - set(names))
        if unknown:
            raise TypeError(f"expect has unknown fields {unknown}; known: {names}.")
        manifest = jsonfiles.read(os.path.join(path, MANIFEST))
        if manifest is None:
            hint = (
                " (an unfinished write is in .partial)" if os.path.isdir(f"{path}.partial") else ""
            )
            raise TeacherCacheError(f"No teacher cache at {path}: no {MANIFEST}{hint}.")
        fixed = {"format": FORMAT, "format_version": FORMAT_VERSION}
        wrong = _mismatches(manifest, fixed)
        if wrong:
            raise TeacherCacheError(f"{path} is not a readable teacher cache:\n" + "\n".join(wrong))
        wrong = _mismatches(manifest, expect or {})
        if wrong:
            raise CacheMismatchError(
                f"The teacher cache {path} was made for another run:\n" + "\n".join(wrong)
            )
        for shard in manifest["shards"]:
            file = os.path.join(path, shard["file"])
            size = os.path.getsize(file) if os.path.exists(file) else None
            if size != shard["bytes"]:
                raise TeacherCacheError(
                    f"{file}: {size} bytes on disk, {shard['bytes']} in the manifest."
                )
        return cls(path, manifest)

    def __len__(self) -> int:
        return self.spec.num_records

    @property
    def keys(self) -> tuple[str, ...]:
        """The batch keys :meth:`read` returns."""
        return tuple(field.key for field in self.spec.layout)

    @property
    def bytes_per_token(self) -> float | None:
        """Shard bytes on disk per cached token (``num_records * seq_len`` tokens);
        None for a cache without a token axis (``seq_len=None``)."""
        value = self.manifest["bytes_per_token"]
        return None if value is None else float(value)

    @property
    def bytes_per_record(self) -> float:
        """Shard bytes on disk per record (per example, or per window)."""
        return self.manifest["bytes"] / self.spec.num_records

    @property
    def augmentation_seed(self) -> int | None:
        """The seed of the augmentation the teacher saw (None: no augmentation)."""
        return self.spec.augmentation_seed

    def _reader(self, shard: int) -> ArrayRecordReader:
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        if shard not in readers:
            file = os.path.join(self.path, self.manifest["shards"][shard]["file"])
            readers[shard] = ArrayRecordReader(file, READER_OPTIONS)
        return readers[shard]

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records of examples (windows) ``indices`` [B], as a batch.

        Returns:
          ``teacher_top_k_log_probs`` float32 [B, L, k], ``teacher_top_k_indices``
          int32 [B, L, k] and ``teacher_top_k_log_tail`` float32 [B, L]; or
          ``teacher_logits`` float32 [B, L, V] for a full-logits cache. Without a
          token axis (``seq_len=None``): [B, k], [B, k], [B] or [B, V].

        Raises:
          ValueError: ``indices`` is not a 1-D integer array.
          IndexError: an index outside ``[0, num_records)``.
        """
        indices = np.asarray(indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(
                f"indices must be a 1-D integer array, got shape {indices.shape} and "
                f"dtype {indices.dtype}."
            )
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(
                f"indices must lie in [0, {len(self)}), got {indices.min()} to {indices.max()}."
            )
        records: list[bytes] = [b""] * len(indices)
        shards = indices // self.records_per_shard
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            positions = (indices[where] - shard * self.records_per_shard).tolist()
            for slot, record in zip(where, self._reader(int(shard)).read(positions), strict=True):
                records[slot] = record
        if not records:
            return {
                field.key: np.zeros((0, *field.shape), field.read_dtype)
                for field in self.spec.layout
            }
        return self.spec.decode(records)

    def close(self) -> None:
        """Closes this thread's shard readers (others close when their thread ends)."""
        for reader in getattr(self._local, "readers", {}).values():
            reader.close()
        self._local.readers = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["manifest"])

    def __repr__(self) -> str:
        spec = self.spec
        what = "full logits" if spec.k is None else f"top-{spec.k}"
        if spec.seq_len is None:
            size = f"{spec.num_records} examples, {self.bytes_per_record:.1f} bytes/example"
        else:
            size = (
                f"{spec.num_records} records of {spec.seq_len} tokens, "
                f"{self.bytes_per_token:.1f} bytes/token"
            )
        return f"TeacherCache({self.path!r}, {what} {spec.dtype}, {size})"


class WithTeacherCache:
    """A random-access source whose example ``i`` also holds the cache's record ``i``.

    For a training pipeline (``experiments.data.loader``): example ``i`` is
    ``{**source[i], **record_i}`` with the record's arrays as :meth:`TeacherCache.read`
    returns them, without the batch axis.

    Args:
      source: random-access examples (``len`` and ``source[i] -> dict``), e.g.
        ``lm_data.PackedWindows``: the windows the cache was made from.
      cache: a :class:`TeacherCache` with one record per example.

    Raises:
      ValueError: if the lengths differ or the keys collide.
    """

    def __init__(self, source, cache: TeacherCache):
        if len(source) != len(cache):
            raise ValueError(
                f"The source has {len(source)} examples and the teacher cache {len(cache)} "
                "records; record i must be the teacher's outputs on example i."
            )
        self.source = source
        self.cache = cache

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
        examples = [self.source[int(index)] for index in indices]
        teacher = self.cache.read(np.asarray(indices, np.int64).reshape(-1))
        clash = sorted(set(teacher) & set(examples[0])) if examples else []
        if clash:
            raise ValueError(f"The source's examples already have the keys {clash}.")
        return [
            {**example, **{key: value[row] for key, value in teacher.items()}}
            for row, example in enumerate(examples)
        ]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.__getitems__([index])[0]


class CachedTeacherLoader(loader.TrainLoader):
    """:class:`loader.TrainLoader`'s batches with each example's cached teacher outputs.

    Batch ``k`` holds the examples the ``TrainLoader`` of the same arrays, batch
    size and seed yields at step ``k``, in the same order, plus ``teacher[key][i]``
    for example ``i``: ``teacher_logits`` float32 [B_local, C] for a full-logits
    cache (``teacher_top_k_*`` for a top-k one). The teacher's records are read
    into memory once, like the examples; resuming and checkpoints work as for
    ``TrainLoader``.

    Args:
      arrays: the training examples ``{"image": [N, ...], "label": [N]}``.
      teacher: the cache's records of every example, ``{key: [N, ...]}``
        (``TeacherCache.read(np.arange(N))``).
      global_batch_size: batch size summed over all processes.
      seed: non-negative integer; with the epoch it fixes the order.
    """

    def __init__(self, arrays, teacher, *, global_batch_size: int, seed: int):
        sizes = {key: len(value) for key, value in {**arrays, **teacher}.items()}
        clash = sorted(set(arrays) & set(teacher))
        if len(set(sizes.values())) != 1 or clash:
            raise ValueError(
                f"The teacher's records must be one per example, under new keys: sizes "
                f"{sizes}, keys in both {clash}."
            )
        to_batch = loader.ClassificationBatch()

        def with_teacher(batch):
            return {**to_batch(batch), **{key: batch[key] for key in teacher}}

        self._indices = loader.GlobalBatchIndices(
            sizes["label"], global_batch_size=global_batch_size, seed=seed
        )
        # TrainLoader's pipeline over the examples and the teacher's records together.
        self.dataset = loader.train_dataset(
            {**arrays, **teacher},
            global_batch_size=global_batch_size,
            seed=seed,
            keys=(*to_batch.keys, *teacher),
            transform=with_teacher,
        )
        iterable = self.dataset.to_iter_dataset(loader.IN_MEMORY_READ_OPTIONS)
        grain.DatasetIterator.__init__(self, iter(iterable))
