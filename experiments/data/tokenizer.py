"""Tokenizers for the language-model experiments: byte-level BPE and plain bytes.

Both have the same face (:class:`Tokenizer`): ``vocab_size``, ``pad_id`` (always
0), ``eos_id`` (always 1), ``encode``, ``encode_batch``, ``decode`` and a
``fingerprint`` that names the vocabulary, for keying caches of tokenized data.

* :class:`BpeTokenizer`: byte-level BPE trained locally with the ``tokenizers``
  package. Any text encodes (every byte has a token) and decodes back exactly.
  Training is deterministic given the documents.
* :class:`ByteTokenizer`: UTF-8 bytes shifted by 2 past the specials; needs no
  training, 258 ids.

The specials are never produced from text: a document containing the
characters ``<eos>`` encodes them as ordinary bytes. Decoding drops special ids.

:func:`load_or_train_tokenizer` trains a BPE once per (corpus, vocab size) and
keeps it as a JSON file::

    tokenizer = load_or_train_tokenizer(
        "bpe", vocab_size=8192, directory=workdir, corpus_fingerprint=fingerprint,
        documents_fn=lambda: read_documents("train", data_dir=data_dir),
    )
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

PAD = "<pad>"
EOS = "<eos>"
SPECIAL_TOKENS = (PAD, EOS)  # Ids 0 and 1, in this order, for every tokenizer.
PAD_ID = 0
EOS_ID = 1

DEFAULT_VOCAB_SIZE = 8192
_NUM_BYTES = 256
# The smallest BPE vocabulary: the specials and one token per byte, no merges.
MIN_BPE_VOCAB_SIZE = len(SPECIAL_TOKENS) + _NUM_BYTES
_BPE_MIN_FREQUENCY = 2  # A pair seen once is not worth a token.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@runtime_checkable
class Tokenizer(Protocol):
    """What the LM data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of ids; every id is in ``[0, vocab_size)``."""

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """A stable name of the vocabulary: equal fingerprints encode equally."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special ids are dropped."""


class ByteTokenizer:
    """UTF-8 bytes as ids ``2 + byte``, after ``<pad>`` (0) and ``<eos>`` (1).

    >>> tokenizer = ByteTokenizer()
    >>> tokenizer.encode("hé")
    [106, 197, 171]
    >>> tokenizer.decode([106, 197, 171, 1])
    'hé'
    """

    vocab_size = len(SPECIAL_TOKENS) + _NUM_BYTES
    pad_id = PAD_ID
    eos_id = EOS_ID
    fingerprint = "bytes-v1"
    _offset = len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return [byte + self._offset for byte in text.encode("utf-8")]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in ``ids``; invalid UTF-8 becomes U+FFFD.

        Raises:
            ValueError: if an id is outside ``[0, vocab_size)``.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[:5]}.")
        data = bytes(i - self._offset for i in ids if i >= self._offset)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BpeTokenizer:
    """Byte-level BPE (``tokenizers``): GPT-2 style pre-tokenization, no normalization.

    Build one with :meth:`train` or :meth:`load`. Ids 0 and 1 are ``<pad>``
    and ``<eos>``, the next 256 are the bytes, then the merges in the order
    they were learnt.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` made by :meth:`train` (or read
            from its JSON); its ids 0 and 1 must be ``<pad>`` and ``<eos>``.
    """

    pad_id = PAD_ID
    eos_id = EOS_ID

    def __init__(self, tokenizer):
        for token_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != token_id:
                raise ValueError(
                    f"{token} must have id {token_id}, got {tokenizer.token_to_id(token)}."
                )
        # Specials in the text are text: only the pipeline adds <eos> (not saved in JSON).
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.fingerprint = _bpe_fingerprint(tokenizer)

    @classmethod
    def train(
        cls, documents: Sequence[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE
    ) -> BpeTokenizer:
        """Trains on ``documents`` (deterministic: same documents, same vocabulary).

        Args:
            documents: training texts, e.g. a corpus's train split.
            vocab_size: the most ids the result may have, specials and bytes
                included (at least 258); fewer when the documents run out of
                pairs seen twice.

        Raises:
            ValueError: for a ``vocab_size`` below 258 or no documents.
        """
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, int)
            or vocab_size < MIN_BPE_VOCAB_SIZE
        ):
            raise ValueError(
                f"vocab_size must be an int of at least {MIN_BPE_VOCAB_SIZE} (2 specials "
                f"and 256 bytes), got {vocab_size!r}."
            )
        if not documents:
            raise ValueError("documents must not be empty: there is nothing to train on.")
        tokenizer = HfTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=_BPE_MIN_FREQUENCY,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BpeTokenizer:
        """Reads a tokenizer written by :meth:`save`."""
        from tokenizers import Tokenizer as HfTokenizer

        return cls(HfTokenizer.from_file(os.fspath(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer as JSON, atomically (beside ``path``, then renamed)."""
        _write_atomically(path, self._tokenizer.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"BpeTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def _bpe_fingerprint(tokenizer) -> str:
    """``"bpe-"`` and a sha256 prefix of the vocabulary, merges and specials."""
    model = json.loads(tokenizer.to_str())["model"]
    # Merges are "a b" strings in older `tokenizers` and [a, b] pairs in newer ones.
    merges = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model["merges"]]
    canonical = json.dumps(
        {
            "scheme": "bytelevel-bpe-v1",
            "specials": SPECIAL_TOKENS,
            "vocab": sorted(model["vocab"].items(), key=lambda item: item[1]),
            "merges": merges,
        },
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return "bpe-" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _write_atomically(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def tokenizer_path(
    directory: str | os.PathLike, *, vocab_size: int, corpus_fingerprint: str
) -> str:
    """Where :func:`load_or_train_tokenizer` keeps a BPE: ``bpe-v<size>-<corpus>.json``."""
    if not _SAFE_NAME.fullmatch(corpus_fingerprint):
        raise ValueError(
            f"corpus_fingerprint must be letters, digits, '_', '.' or '-', "
            f"got {corpus_fingerprint!r}."
        )
    return os.path.join(os.fspath(directory), f"bpe-v{vocab_size}-{corpus_fingerprint[:32]}.json")


def load_or_train_tokenizer(
    kind: str,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    directory: str | os.PathLike | None = None,
    corpus_fingerprint: str | None = None,
    documents_fn: Callable[[], Sequence[str]] | None = None,
) -> BpeTokenizer | ByteTokenizer:
    """The tokenizer of a corpus: read from ``directory``, or trained and kept there.

    Args:
        kind: ``"bpe"`` or ``"bytes"``; ``"bytes"`` ignores the other arguments.
        vocab_size: BPE vocabulary size (see :meth:`BpeTokenizer.train`).
        directory: where trained tokenizers are kept (created if missing).
        corpus_fingerprint: names the training documents (for
            ``python_stdlib_source``, ``corpus_metadata(...)["fingerprint"]``).
            It is part of the file name with ``vocab_size``, so another corpus
            or size never reuses a file.
        documents_fn: returns the training documents (a corpus's train split
            only); called only when no file is kept yet.

    Raises:
        ValueError: for an unknown ``kind``, or for ``"bpe"`` without
            ``directory``, ``corpus_fingerprint`` or ``documents_fn``.
    """
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"kind must be 'bpe' or 'bytes', got {kind!r}.")
    missing = [
        name
        for name, value in (
            ("directory", directory),
            ("corpus_fingerprint", corpus_fingerprint),
            ("documents_fn", documents_fn),
        )
        if value is None
    ]
    if missing:
        raise ValueError(f"kind='bpe' needs {', '.join(missing)}.")
    path = tokenizer_path(directory, vocab_size=vocab_size, corpus_fingerprint=corpus_fingerprint)
    if os.path.exists(path):
        return BpeTokenizer.load(path)
    tokenizer = BpeTokenizer.train(documents_fn(), vocab_size=vocab_size)
    os.makedirs(os.fspath(directory), exist_ok=True)
    tokenizer.save(path)
    return tokenizer
