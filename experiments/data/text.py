"""An offline text corpus: the running Python's standard library source, as a TFDS builder.

``python_stdlib_source`` holds one example per ``*.py`` file of the standard
library of the Python that builds it (``sysconfig.get_paths()["stdlib"]``):

* ``text``: the file's contents, decoded as UTF-8 with ``errors="replace"``
  (an invalid byte becomes U+FFFD, always the same way), line endings kept.
* ``path``: the file's path relative to the library root, ``/``-separated.

What is left out, and why:

* ``site-packages`` and ``dist-packages``: third-party code, not the library.
* ``__pycache__``, hidden directories, symbolic links, empty files.
* Test suites: directories named ``test``, ``tests`` or ``idle_test`` (about
  60% of the bytes). Distributions ship them separately or not at all (Debian's
  ``libpython3.x-testsuite``), so keeping them would make the corpus depend on
  how Python was installed; they also hold files that are deliberately
  malformed (bad encodings, syntax errors) and large generated test data.
* Generated files that are data rather than code: ``_sysconfigdata_*.py``
  (describes the machine Python was built on), ``config-*`` directories
  (``python-config.py``), and ``pydoc_data/topics.py`` (750 kB of
  documentation text in one dict literal).

The split is by file, from a hash of the relative path: a file lands in
``train`` (90%), ``validation`` (5%) or ``test`` (5%) whatever else is in the
library, so no file straddles splits and a file keeps its split across Python
versions. Configs:

* ``full`` (the default): every selected file, 728 files and 11.3 MB on CPython 3.11.7.
* ``small``: a deterministic subset for quick runs and tests. Files of at most
  32 KiB, visited in the order of a second (salted) hash of their path, are
  taken until the train split holds 768 KiB of text.

``info.metadata`` records the Python version and a fingerprint of the files
that went in (:func:`fingerprint_files`); :func:`corpus_metadata` reads them
back. Use the fingerprint to key anything derived from the corpus (a trained
tokenizer, a tokenized split)::

    prepare_text("small", data_dir)
    documents = read_documents("train", data_dir=data_dir, config="small")
    fingerprint = corpus_metadata(data_dir, config="small")["fingerprint"]

Building needs neither TensorFlow nor network access (checked with
tensorflow-datasets 4.9.10). A data_dir keeps what was built first: the
metadata says which Python that was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from experiments.data.builders import FILE_FORMAT

DATASET_NAME = "python_stdlib_source"
SPLITS = ("train", "validation", "test")

# Percent of files in each split, decided by a hash of the relative path.
_SPLIT_PERCENTS = {"train": 90, "validation": 5, "test": 5}

_EXCLUDED_DIRECTORIES = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_EXCLUDED_FILES = frozenset({"pydoc_data/topics.py"})

_SMALL_MAX_FILE_BYTES = 32 * 1024
_SMALL_TRAIN_BYTES = 768 * 1024

# See builders.py: TFDS would otherwise look for `importlib_resources`.
_CODE_PATH = epath.Path(__file__)


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One selected file of the library.

    Attributes:
        path: path relative to the library root, ``/``-separated.
        data: the file's bytes.
    """

    path: str
    data: bytes

    @property
    def split(self) -> str:
        return split_of(self.path)

    @property
    def text(self) -> str:
        return decode_source(self.data)


def decode_source(data: bytes) -> str:
    """UTF-8 text of ``data``; each invalid byte becomes U+FFFD (deterministic)."""
    return data.decode("utf-8", errors="replace")


def _path_hash(path: str, *, salt: str) -> int:
    """A stable 64-bit hash of ``path`` (sha256; Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{salt}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_of(path: str) -> str:
    """The split (``train``, ``validation`` or ``test``) of a relative path.

    >>> split_of("json/decoder.py") in SPLITS
    True
    """
    bucket = _path_hash(path, salt="split") % 100
    for split, percent in _SPLIT_PERCENTS.items():
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("split percents must sum to 100")


def default_stdlib_root() -> str:
    """The running Python's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def _excluded_file(path: str, name: str) -> bool:
    return (
        not name.endswith(".py")
        or name.startswith(".")
        or name.startswith("_sysconfigdata_")
        or path in _EXCLUDED_FILES
    )


def _excluded_directory(name: str) -> bool:
    return name in _EXCLUDED_DIRECTORIES or name.startswith(".") or name.startswith("config-")


def list_source_files(root: str | os.PathLike | None = None) -> list[SourceFile]:
    """The selected ``*.py`` files under ``root``, sorted by relative path.

    Args:
        root: library directory; None for the running Python's
            (:func:`default_stdlib_root`).

    Returns:
        The files that make up the ``full`` config (see the module docstring
        for what is left out), with their bytes.

    Raises:
        ValueError: if ``root`` is not a directory.
    """
    root = os.fspath(default_stdlib_root() if root is None else root)
    if not os.path.isdir(root):
        raise ValueError(f"stdlib_root must be a directory, got {root!r}.")
    files = []
    for directory, subdirectories, names in os.walk(root):  # Never follows links.
        subdirectories[:] = sorted(
            name
            for name in subdirectories
            if not _excluded_directory(name) and not os.path.islink(os.path.join(directory, name))
        )
        relative_directory = os.path.relpath(directory, root)
        for name in sorted(names):
            full_path = os.path.join(directory, name)
            relative = os.path.normpath(os.path.join(relative_directory, name))
            relative = relative.replace(os.sep, "/")
            if _excluded_file(relative, name) or os.path.islink(full_path):
                continue
            with open(full_path, "rb") as f:
                data = f.read()
            if data:
                files.append(SourceFile(relative, data))
    return sorted(files, key=lambda file: file.path)


def small_subset(files: Sequence[SourceFile]) -> list[SourceFile]:
    """The ``small`` config's files among ``files``, sorted by relative path.

    Files of at most 32 KiB, in the order of a salted hash of their path,
    until the train files among them hold at least 768 KiB (or none are left).
    """
    candidates = sorted(
        (file for file in files if len(file.data) <= _SMALL_MAX_FILE_BYTES),
        key=lambda file: (_path_hash(file.path, salt="small"), file.path),
    )
    chosen, train_bytes = [], 0
    for file in candidates:
        if train_bytes >= _SMALL_TRAIN_BYTES:
            break
        chosen.append(file)
        if file.split == "train":
            train_bytes += len(file.data)
    return sorted(chosen, key=lambda file: file.path)


def fingerprint_files(files: Sequence[SourceFile]) -> str:
    """A sha256 hex digest of a corpus: every file's relative path and content hash.

    Independent of the order of ``files``; it also covers the dataset version,
    so a change to the split rule changes it too.
    """
    digest = hashlib.sha256(f"{DATASET_NAME}/{PythonStdlibSource.VERSION}\n".encode())
    for file in sorted(files, key=lambda file: file.path):
        content = hashlib.sha256(file.data).hexdigest()
        digest.update(f"{file.path}\t{len(file.data)}\t{content}\n".encode())
    return digest.hexdigest()


@dataclasses.dataclass
class PythonStdlibSourceConfig(tfds.core.BuilderConfig):
    """Config of ``python_stdlib_source``.

    Attributes:
        small: True for the deterministic subset of :func:`small_subset`.
    """

    small: bool = False


class PythonStdlibSource(tfds.core.GeneratorBasedBuilder):
    """The running Python's standard library source files as a text dataset.

    Args:
        stdlib_root: library directory to read instead of the running Python's
            (tests point it at a directory of their own files).
        **kwargs: passed to ``tfds.core.DatasetBuilder`` (``data_dir``,
            ``config``, ``file_format``, ...).
    """

    name = DATASET_NAME
    code_path = _CODE_PATH
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: split 90/5/5 by a sha256 of the path."}
    BUILDER_CONFIGS = [
        PythonStdlibSourceConfig(name="full", description="Every selected file."),
        PythonStdlibSourceConfig(
            name="small",
            description="Files of at most 32 KiB until the train split holds 768 KiB.",
            small=True,
        ),
    ]
    DEFAULT_CONFIG_NAME = "full"

    def __init__(self, *, stdlib_root: str | os.PathLike | None = None, **kwargs: Any):
        self._stdlib_root = None if stdlib_root is None else os.fspath(stdlib_root)
        super().__init__(**kwargs)
        self._original_state["stdlib_root"] = self._stdlib_root

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Source files (*.py) of the Python standard library that built the "
                "dataset, without test suites and generated files; split by file, "
                "90/5/5, from a hash of the relative path."
            ),
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            # Filled while generating (see `_split_generators`), then read back from disk.
            metadata=tfds.core.MetadataDict(),
            homepage="https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Nothing to download.
        files = list_source_files(self._stdlib_root)
        if self.builder_config.small:
            files = small_subset(files)
        self.info.metadata.update(
            {
                "fingerprint": fingerprint_files(files),
                "python_version": platform.python_version(),
                "python_implementation": platform.python_implementation(),
                "num_files": len(files),
                "num_bytes": sum(len(file.data) for file in files),
            }
        )
        return {
            split: self._generate_examples([file for file in files if file.split == split])
            for split in SPLITS
        }

    def _generate_examples(
        self, files: Sequence[SourceFile]
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """Yields ``(key, example)``; the key is the relative path."""
        for file in files:
            yield file.path, {"text": file.text, "path": file.path}


def _config_name(name_or_config: str) -> str:
    """``"full"``, ``"small"``, or either prefixed with ``"python_stdlib_source/"``."""
    name = name_or_config
    if name == DATASET_NAME:
        return PythonStdlibSource.DEFAULT_CONFIG_NAME
    if name.startswith(f"{DATASET_NAME}/"):
        name = name[len(DATASET_NAME) + 1 :]
    if name not in PythonStdlibSource.builder_configs:
        raise ValueError(
            f"Unknown {DATASET_NAME} config {name_or_config!r}; known configs: "
            f"{sorted(PythonStdlibSource.builder_configs)}."
        )
    return name


def text_builder(
    name_or_config: str | PythonStdlibSourceConfig,
    data_dir: str | os.PathLike | None,
    **builder_kwargs: Any,
) -> PythonStdlibSource:
    """The ``python_stdlib_source`` builder of a config, without building anything."""
    if not isinstance(name_or_config, PythonStdlibSourceConfig):
        name_or_config = _config_name(name_or_config)
    return PythonStdlibSource(
        config=name_or_config,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        file_format=FILE_FORMAT,
        **builder_kwargs,
    )


def prepare_text(
    name_or_config: str | PythonStdlibSourceConfig = "full",
    data_dir: str | os.PathLike | None = None,
    **builder_kwargs: Any,
) -> PythonStdlibSource:
    """Builds ``python_stdlib_source`` once, as array_record files under ``data_dir``.

    Idempotent: when the config is already prepared in ``data_dir`` the files
    are reused and nothing is read from the library again.

    Args:
        name_or_config: ``"full"``, ``"small"`` (optionally prefixed with
            ``"python_stdlib_source/"``; the bare dataset name means ``full``),
            or a :class:`PythonStdlibSourceConfig`.
        data_dir: TFDS data directory (created if missing); None for TFDS's default.
        **builder_kwargs: passed to the builder, e.g. ``stdlib_root``.

    Returns:
        The prepared builder.

    Raises:
        ValueError: if the config name is unknown.
    """
    builder = text_builder(name_or_config, data_dir, **builder_kwargs)
    builder.download_and_prepare(file_format=FILE_FORMAT)
    return builder


def corpus_metadata(data_dir: str | os.PathLike | None, *, config: str = "full") -> dict[str, Any]:
    """The metadata of a prepared config: ``fingerprint``, ``python_version``, ...

    Returns:
        ``fingerprint`` (:func:`fingerprint_files` of the files built),
        ``python_version``, ``python_implementation``, ``num_files`` and ``num_bytes``.

    Raises:
        ValueError: if the config is not prepared in ``data_dir``.
    """
    builder = text_builder(config, data_dir)
    if not builder.is_prepared():
        raise ValueError(
            f"{DATASET_NAME}/{_config_name(config)} is not prepared in data_dir={data_dir!r}; "
            "call prepare_text first."
        )
    return dict(builder.info.metadata)


def read_examples(
    split: str, *, data_dir: str | os.PathLike | None, config: str = "full"
) -> list[tuple[str, str]]:
    """``(path, text)`` of every file of a prepared split, sorted by path.

    Read with ``tfds.data_source`` (no TensorFlow).

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    source = tfds.data_source(
        f"{DATASET_NAME}/{_config_name(config)}",
        split=split,
        data_dir=None if data_dir is None else os.fspath(data_dir),
    )
    examples = source.__getitems__(list(range(len(source)))) if len(source) else []
    pairs = [(_as_str(example["path"]), _as_str(example["text"])) for example in examples]
    return sorted(pairs)


def read_documents(
    split: str, *, data_dir: str | os.PathLike | None, config: str = "full"
) -> list[str]:
    """The texts of a prepared split, in the order of their paths (see :func:`read_examples`)."""
    return [text for _, text in read_examples(split, data_dir=data_dir, config=config)]


def _as_str(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
