"""Tests of the LM data layer: the stdlib text corpus, tokenizers and token windows."""

import os
import platform

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.data import lm_data, text, tokenizer
from experiments.data.lm_data import PackedWindows, PaddedWindows
from experiments.data.tokenizer import BpeTokenizer, ByteTokenizer

SMALL_VOCAB = 512
NON_ASCII = "naïve café: π ≈ 3.14, 数据, emoji 😀, tab\t and NUL \x00 end"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data_dir holding ``python_stdlib_source/small``."""
    directory = tmp_path_factory.mktemp("tfds")
    text.prepare_text("small", directory)
    return directory


@pytest.fixture(scope="module")
def small_train(data_dir):
    return text.read_documents("train", data_dir=data_dir, config="small")


@pytest.fixture(scope="module")
def bpe(small_train):
    return BpeTokenizer.train(small_train, vocab_size=SMALL_VOCAB)


def _paths(data_dir, split, config="small"):
    return [path for path, _ in text.read_examples(split, data_dir=data_dir, config=config)]


def _write(root, relative, data):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def fake_stdlib(tmp_path):
    """A library directory of 40 kept files and some that must be left out."""
    root = tmp_path / "lib"
    for index in range(30):
        _write(root, f"module_{index}.py", f"VALUE = {index}\n".encode())
    for index in range(10):
        _write(root, f"package/sub_{index}.py", f"def f():\n    return {index}\n".encode())
    _write(root, "package/bad_bytes.py", b"s = '\xff\xfe'\n")
    for left_out in (
        "site-packages/third_party.py",
        "dist-packages/other.py",
        "package/__pycache__/sub_0.py",
        "test/test_module.py",
        "package/tests/test_sub.py",
        "idlelib/idle_test/test_idle.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "pydoc_data/topics.py",
        "_sysconfigdata__linux.py",
        ".hidden/module.py",
        "notes.txt",
    ):
        _write(root, left_out, b"LEFT_OUT = True\n")
    _write(root, "empty.py", b"")
    return root


# The corpus.


def test_small_config_builds_with_metadata(data_dir, small_train):
    builder = tfds.builder("python_stdlib_source/small", data_dir=os.fspath(data_dir))
    metadata = builder.info.metadata
    assert metadata == text.corpus_metadata(data_dir, config="small")
    assert metadata["python_version"] == platform.python_version()
    files = text.small_subset(text.list_source_files())
    assert metadata["fingerprint"] == text.fingerprint_files(files)
    assert metadata["num_files"] == len(files)
    assert all(builder.info.splits[split].num_examples > 0 for split in text.SPLITS)
    train_bytes = sum(len(document.encode()) for document in small_train)
    assert 500_000 <= train_bytes <= 1_100_000


def test_splits_are_disjoint_by_path_and_follow_the_hash(data_dir):
    paths = {split: _paths(data_dir, split) for split in text.SPLITS}
    every_path = [path for split in text.SPLITS for path in paths[split]]
    assert len(every_path) == len(set(every_path))
    for split, split_paths in paths.items():
        assert all(text.split_of(path) == split for path in split_paths)
    expected = text.small_subset(text.list_source_files())
    assert sorted(every_path) == [file.path for file in expected]
    for path in every_path:
        parts = path.split("/")
        assert path.endswith(".py") and not {"test", "tests", "site-packages"} & set(parts)


def test_build_is_deterministic(data_dir, tmp_path):
    text.prepare_text("python_stdlib_source/small", tmp_path)
    for split in text.SPLITS:
        assert text.read_examples(split, data_dir=tmp_path, config="small") == (
            text.read_examples(split, data_dir=data_dir, config="small")
        )
    assert text.corpus_metadata(tmp_path, config="small") == (
        text.corpus_metadata(data_dir, config="small")
    )


def test_split_of_is_pinned_and_roughly_90_5_5():
    # Pinned: a change to the split rule moves files between splits.
    expected = {"m0.py": "train", "m1.py": "test", "m15.py": "validation", "m45.py": "validation"}
    assert {path: text.split_of(path) for path in expected} == expected
    counts = {split: 0 for split in text.SPLITS}
    for index in range(4000):
        counts[text.split_of(f"module_{index}.py")] += 1
    assert 3500 <= counts["train"] <= 3700
    assert 120 <= counts["validation"] <= 280 and 120 <= counts["test"] <= 280


def test_list_source_files_leaves_out_tests_packages_and_generated(fake_stdlib):
    files = text.list_source_files(fake_stdlib)
    expected = sorted(
        [f"module_{i}.py" for i in range(30)]
        + [f"package/sub_{i}.py" for i in range(10)]
        + ["package/bad_bytes.py"]
    )
    assert [file.path for file in files] == expected
    bad = next(file for file in files if file.path == "package/bad_bytes.py")
    assert bad.text == "s = '\ufffd\ufffd'\n"


def test_fingerprint_is_stable_and_tracks_the_file_list(fake_stdlib):
    before = text.fingerprint_files(text.list_source_files(fake_stdlib))
    assert text.fingerprint_files(text.list_source_files(fake_stdlib)) == before
    assert text.fingerprint_files(list(reversed(text.list_source_files(fake_stdlib)))) == before
    _write(fake_stdlib, "module_0.py", b"VALUE = 9\n")  # Same size, new content.
    changed = text.fingerprint_files(text.list_source_files(fake_stdlib))
    assert changed != before
    _write(fake_stdlib, "added.py", b"ADDED = 1\n")
    assert text.fingerprint_files(text.list_source_files(fake_stdlib)) not in (before, changed)


def test_builder_reads_an_injected_root(fake_stdlib, tmp_path):
    builder = text.prepare_text("full", tmp_path / "a", stdlib_root=fake_stdlib)
    files = text.list_source_files(fake_stdlib)
    assert builder.info.metadata["fingerprint"] == text.fingerprint_files(files)
    read = [
        pair
        for split in text.SPLITS
        for pair in text.read_examples(split, data_dir=tmp_path / "a", config="full")
    ]
    assert sorted(read) == [(file.path, file.text) for file in files]

    _write(fake_stdlib, "added.py", b"ADDED = 1\n")
    text.prepare_text("full", tmp_path / "b", stdlib_root=fake_stdlib)
    assert (
        text.corpus_metadata(tmp_path / "b")["fingerprint"]
        != (text.corpus_metadata(tmp_path / "a")["fingerprint"])
    )


def test_unknown_config_and_unprepared_data_dir_are_errors(tmp_path):
    with pytest.raises(ValueError, match="'tiny'"):
        text.prepare_text("tiny", tmp_path)
    with pytest.raises(ValueError, match="not prepared"):
        text.corpus_metadata(tmp_path, config="small")
    with pytest.raises(ValueError, match="split must be one of"):
        text.read_documents("dev", data_dir=tmp_path, config="small")


# Tokenizers.


def test_bpe_roundtrips_stdlib_text(bpe, data_dir):
    documents = text.read_documents("validation", data_dir=data_dir, config="small")
    encoded = bpe.encode_batch(documents)
    assert encoded == [bpe.encode(document) for document in documents]
    assert [bpe.decode(ids) for ids in encoded] == documents
    assert bpe.decode(bpe.encode(NON_ASCII)) == NON_ASCII
    num_bytes = sum(len(document.encode()) for document in documents)
    assert sum(map(len, encoded)) < 0.6 * num_bytes  # Merges compress.


def test_bpe_vocab_size_and_specials(bpe, small_train):
    assert bpe.vocab_size == SMALL_VOCAB
    assert (bpe.pad_id, bpe.eos_id) == (0, 1)
    ids = [i for document in small_train[:20] for i in bpe.encode(document)]
    assert 0 <= min(ids) and max(ids) < SMALL_VOCAB
    assert bpe.pad_id not in ids and bpe.eos_id not in ids
    # Special tokens in the text are text.
    with_specials = "x = '<eos>' + '<pad>'"
    assert {0, 1}.isdisjoint(bpe.encode(with_specials))
    assert bpe.decode(bpe.encode(with_specials)) == with_specials
    assert bpe.decode([bpe.eos_id, *bpe.encode("ab"), bpe.pad_id]) == "ab"


def test_bpe_training_is_deterministic(bpe, small_train, tmp_path):
    again = BpeTokenizer.train(small_train, vocab_size=SMALL_VOCAB)
    assert again.fingerprint == bpe.fingerprint
    assert again._tokenizer.get_vocab() == bpe._tokenizer.get_vocab()
    bpe.save(tmp_path / "bpe.json")
    loaded = BpeTokenizer.load(tmp_path / "bpe.json")
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.encode(small_train[0]) == bpe.encode(small_train[0])
    smaller = BpeTokenizer.train(small_train[:10], vocab_size=300)
    assert smaller.vocab_size <= 300 and smaller.fingerprint != bpe.fingerprint


def test_bpe_rejects_a_vocabulary_without_room_for_bytes():
    with pytest.raises(ValueError, match="vocab_size must be an int of at least 258"):
        BpeTokenizer.train(["abc"], vocab_size=257)
    with pytest.raises(ValueError, match="documents must not be empty"):
        BpeTokenizer.train([], vocab_size=300)


def test_load_or_train_caches_by_corpus_and_vocab_size(small_train, tmp_path):
    calls = []

    def documents_fn():
        calls.append(1)
        return small_train[:10]

    def load(fingerprint, vocab_size=300):
        return tokenizer.load_or_train_tokenizer(
            "bpe",
            vocab_size=vocab_size,
            directory=tmp_path,
            corpus_fingerprint=fingerprint,
            documents_fn=documents_fn,
        )

    first = load("a" * 64)
    assert load("a" * 64).fingerprint == first.fingerprint and len(calls) == 1
    load("b" * 64)
    load("a" * 64, vocab_size=280)
    assert len(calls) == 3
    names = sorted(os.listdir(tmp_path))
    assert names == [f"bpe-v280-{'a' * 32}.json", f"bpe-v300-{'a' * 32}.json"] + [
        f"bpe-v300-{'b' * 32}.json"
    ]
    assert isinstance(tokenizer.load_or_train_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match="corpus_fingerprint, documents_fn"):
        tokenizer.load_or_train_tokenizer("bpe", directory=tmp_path)
    with pytest.raises(ValueError, match="'wordpiece'"):
        tokenizer.load_or_train_tokenizer("wordpiece")


def test_byte_tokenizer_roundtrips_non_ascii():
    byte_tokenizer = ByteTokenizer()
    assert isinstance(byte_tokenizer, tokenizer.Tokenizer)
    assert isinstance(BpeTokenizer.train(["abc abd"] * 3, vocab_size=260), tokenizer.Tokenizer)
    ids = byte_tokenizer.encode(NON_ASCII)
    assert ids == [byte + 2 for byte in NON_ASCII.encode()]
    assert byte_tokenizer.decode(ids) == NON_ASCII
    assert byte_tokenizer.decode([1, *ids, 0, 0]) == NON_ASCII
    assert byte_tokenizer.encode_batch(["", "é"]) == [[], [0xC3 + 2, 0xA9 + 2]]
    assert (byte_tokenizer.vocab_size, byte_tokenizer.fingerprint) == (258, "bytes-v1")
    with pytest.raises(ValueError, match=r"\[0, 258\)"):
        byte_tokenizer.decode([258])


# Token streams and windows.


def test_tokenize_split_appends_eos_and_caches(tmp_path):
    byte_tokenizer = ByteTokenizer()
    documents = ["ab", "", "é"]
    expected = np.array([99, 100, 1, 1, 0xC3 + 2, 0xA9 + 2, 1], np.int32)
    stream = lm_data.tokenize_split(
        documents, byte_tokenizer, cache_dir=tmp_path, dataset_fingerprint="f" * 64, split="train"
    )
    np.testing.assert_array_equal(stream, expected)
    assert stream.dtype == np.int32
    assert os.path.exists(tmp_path / ("f" * 64) / "train" / "bytes-v1.npy")

    def must_not_be_called():
        raise AssertionError("documents read despite the cache")

    cache = {"cache_dir": tmp_path, "dataset_fingerprint": "f" * 64}
    cached = lm_data.tokenize_split(must_not_be_called, byte_tokenizer, **cache, split="train")
    np.testing.assert_array_equal(cached, expected)
    with pytest.raises(ValueError, match="split must be letters"):
        lm_data.tokenize_split(documents, byte_tokenizer, **cache)


def test_token_stream_of_a_prepared_split(bpe, data_dir, tmp_path):
    stream = lm_data.token_stream(
        "validation", data_dir=data_dir, config="small", tokenizer=bpe, cache_dir=tmp_path
    )
    documents = text.read_documents("validation", data_dir=data_dir, config="small")
    assert int(np.sum(stream == bpe.eos_id)) == len(documents)
    fingerprint = text.corpus_metadata(data_dir, config="small")["fingerprint"]
    assert os.listdir(tmp_path / fingerprint / "validation") == [f"{bpe.fingerprint}.npy"]


@pytest.mark.parametrize(("num_tokens", "length"), [(10, 1), (23, 4), (25, 4), (7, 6), (100, 9)])
def test_packed_windows_equal_numpy_slicing(num_tokens, length):
    stream = np.arange(1000, 1000 + num_tokens, dtype=np.int64)
    windows = PackedWindows(stream, length)
    reference = stream[: num_tokens // (length + 1) * (length + 1)].reshape(-1, length + 1)
    assert len(windows) == len(reference)
    for index, row in enumerate(reference):
        item = windows[index]
        assert item["tokens"].dtype == np.int32 and item["mask"].dtype == np.bool_
        np.testing.assert_array_equal(item["tokens"], row)
        assert item["mask"].shape == (length + 1,) and item["mask"].all()
    np.testing.assert_array_equal(windows[-1]["tokens"], reference[-1])
    with pytest.raises(IndexError):
        windows[len(reference)]


@pytest.mark.parametrize(("num_tokens", "length"), [(2, 1), (9, 4), (10, 4), (11, 4), (3, 8)])
def test_padded_windows_make_every_token_but_the_first_a_target_once(num_tokens, length):
    pad_id = -7
    stream = np.arange(100, 100 + num_tokens)
    windows = PaddedWindows(stream, length, pad_id=pad_id)
    assert len(windows) == -(-(num_tokens - 1) // length)
    targets = []
    for index in range(len(windows)):
        item = windows[index]
        tokens, mask = item["tokens"], item["mask"]
        assert tokens.shape == mask.shape == (length + 1,)
        assert mask[0]  # A window starts inside the stream.
        np.testing.assert_array_equal(tokens[~mask], pad_id)
        # The real tokens are the stream from the window's start.
        real = tokens[mask]
        np.testing.assert_array_equal(real, stream[index * length : index * length + len(real)])
        targets.extend(tokens[1:][mask[1:]].tolist())
    assert targets == stream[1:].tolist()  # Each once, in order.


def test_windows_feed_grain():
    stream = np.arange(50)
    dataset = grain.MapDataset.source(PackedWindows(stream, 4)).batch(2, drop_remainder=True)
    first = dataset[0]
    assert first["tokens"].shape == (2, 5)
    np.testing.assert_array_equal(first["tokens"], stream[:10].reshape(2, 5))
    evaluation = list(grain.MapDataset.source(PaddedWindows(stream, 8, pad_id=0)))
    assert len(evaluation) == 7 and not evaluation[-1]["mask"][-1]


def test_window_errors_name_the_argument():
    with pytest.raises(ValueError, match="length must be an int of at least 1, got 0"):
        PackedWindows(np.arange(10), 0)
    with pytest.raises(ValueError, match="10 tokens, fewer than one window of length \\+ 1 = 11"):
        PackedWindows(np.arange(10), 10)
    with pytest.raises(ValueError, match="1-D integer array"):
        PackedWindows(np.zeros([2, 5], np.int32), 2)
    with pytest.raises(ValueError, match="1-D integer array"):
        PaddedWindows(np.zeros([5], np.float32), 2, pad_id=0)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        PaddedWindows(np.arange(1), 2, pad_id=0)
    with pytest.raises(ValueError, match="pad_id must be an int"):
        PaddedWindows(np.arange(5), 2, pad_id=None)
