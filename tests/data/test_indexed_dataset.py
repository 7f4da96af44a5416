"""The BIN/IDX format: round trips, the exact byte layout, Megatron-Core interop, and every bad file."""
import os
import struct

import numpy as np
import pytest

from conftest import random_documents, require_reference, write_dataset
from mindpretrain.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                               check_vocab_fits_dtype, token_dtype_for_vocab)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip_documents(tmp_path, dtype):
    documents = random_documents(seed=1, count=50, vocab=200)
    prefix = write_dataset(tmp_path / "corpus", documents, dtype)
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.dtype(dtype)
    assert len(dataset) == dataset.num_documents == 50
    assert dataset.num_tokens == sum(len(d) for d in documents)
    for number, document in enumerate(documents):
        np.testing.assert_array_equal(dataset[number], document)
        np.testing.assert_array_equal(dataset.document(number), document)
        if len(document) >= 3:
            np.testing.assert_array_equal(dataset.get(number, offset=1, length=2), document[1:3])
    assert sorted(os.listdir(tmp_path)) == ["corpus.bin", "corpus.idx"]


def test_multi_sequence_documents(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "s"), np.int32) as builder:
        builder.add_document([1, 2, 3, 4, 5], lengths=[2, 3])
        builder.add_document([6], lengths=[1])
    dataset = IndexedDataset(str(tmp_path / "s"))
    assert len(dataset) == 3 and dataset.num_documents == 2
    np.testing.assert_array_equal(dataset[1], [3, 4, 5])
    np.testing.assert_array_equal(dataset.document(0), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(dataset.document_indices, [0, 2, 3])


def test_byte_layout_matches_hand_checked_header(tmp_path):
    """Documents [7, 8, 9] and [10] as uint16: every byte of both files spelled out by hand."""
    prefix = write_dataset(tmp_path / "tiny", [np.array([7, 8, 9]), np.array([10])], np.uint16)
    expected_idx = (
        b"MMIDIDX\x00\x00"                 # magic
        + struct.pack("<Q", 1)             # version
        + struct.pack("<B", 8)             # dtype code 8 = uint16
        + struct.pack("<Q", 2)             # two sequences
        + struct.pack("<Q", 3)             # document index has 3 entries
        + struct.pack("<2i", 3, 1)         # sequence lengths (int32)
        + struct.pack("<2q", 0, 6)         # byte pointers (int64): 3 tokens * 2 bytes
        + struct.pack("<3q", 0, 1, 2)      # document index (int64)
    )
    assert open(prefix + ".idx", "rb").read() == expected_idx
    assert open(prefix + ".bin", "rb").read() == struct.pack("<4H", 7, 8, 9, 10)


def test_megatron_core_reads_ours_and_we_read_theirs(tmp_path):
    megatron = require_reference("megatron.core.datasets.indexed_dataset")
    documents = random_documents(seed=2, count=30, vocab=129280)
    ours = write_dataset(tmp_path / "ours", documents, np.int32)
    theirs_reading_ours = megatron.IndexedDataset(ours)
    assert len(theirs_reading_ours) == 30
    for number, document in enumerate(documents):
        np.testing.assert_array_equal(theirs_reading_ours[number], document)
    np.testing.assert_array_equal(theirs_reading_ours.document_indices, IndexedDataset(ours).document_indices)

    import torch
    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for document in documents[:10]:
        builder.add_item(torch.tensor(document % 60000))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    ours_reading_theirs = IndexedDataset(str(tmp_path / "theirs"))
    assert ours_reading_theirs.dtype == np.uint16
    for number, document in enumerate(documents[:10]):
        np.testing.assert_array_equal(ours_reading_theirs[number], document % 60000)
    # Same documents, same dtype: the files are byte-identical.
    write_dataset(tmp_path / "ours16", [d % 60000 for d in documents[:10]], np.uint16)
    for suffix in (".bin", ".idx"):
        assert open(tmp_path / f"ours16{suffix}", "rb").read() == open(tmp_path / f"theirs{suffix}", "rb").read()


def test_token_dtype_choice():
    assert token_dtype_for_vocab(32000) == np.uint16
    assert token_dtype_for_vocab(129280) == np.int32
    check_vocab_fits_dtype(65536, np.uint16)
    with pytest.raises(ValueError, match="129280 tokens does not fit token dtype uint16"):
        check_vocab_fits_dtype(129280, np.uint16)


def test_builder_refuses_tokens_outside_dtype_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="do not fit dtype uint16"):
        with IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16) as builder:
            builder.add_document([1, 2, 3])
            builder.add_document([70000])
    assert os.listdir(tmp_path) == []


def test_empty_corpus_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(IndexedDatasetError, match="no documents were written"):
        with IndexedDatasetBuilder(str(tmp_path / "empty"), np.int32):
            pass
    assert os.listdir(tmp_path) == []


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetBuilder(str(tmp_path / "x"), np.int32) as builder:
            builder.add_document([1, 2, 3])
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_rewrite_replaces_old_files_only_when_complete(tmp_path):
    prefix = write_dataset(tmp_path / "c", [np.array([1, 2])], np.int32)
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, np.int32) as builder:
            builder.add_document([5, 6, 7])
            raise RuntimeError("worker died")
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [1, 2])


def test_missing_output_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IndexedDatasetBuilder(str(tmp_path / "nope" / "x"), np.int32)


@pytest.fixture
def good_prefix(tmp_path):
    return write_dataset(tmp_path / "good", random_documents(seed=3, count=5, allow_empty=False), np.int32)


def _rewrite(path, transform):
    data = open(path, "rb").read()
    open(path, "wb").write(transform(data))


@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_missing_file(good_prefix, suffix):
    os.remove(good_prefix + suffix)
    with pytest.raises(IndexedDatasetError, match=rf"good\{suffix}: file not found"):
        IndexedDataset(good_prefix)


def test_unreadable_file(good_prefix, monkeypatch):
    # Permission bits do not stop root (CI runs as root), so ask the access check directly.
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith(".idx"))
    with pytest.raises(IndexedDatasetError, match="not readable"):
        IndexedDataset(good_prefix)


def test_wrong_magic(good_prefix):
    _rewrite(good_prefix + ".idx", lambda data: b"NOTANIDX!" + data[9:])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: not a Megatron index file"):
        IndexedDataset(good_prefix)


def test_unknown_dtype_code(good_prefix):
    _rewrite(good_prefix + ".idx", lambda data: data[:17] + bytes([42]) + data[18:])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: unknown dtype code 42"):
        IndexedDataset(good_prefix)


def test_unsupported_version(good_prefix):
    _rewrite(good_prefix + ".idx", lambda data: data[:9] + struct.pack("<Q", 2) + data[17:])
    with pytest.raises(IndexedDatasetError, match="index version 2 is not supported"):
        IndexedDataset(good_prefix)


@pytest.mark.parametrize("keep", [5, 20, 40, -8])
def test_truncated_index(good_prefix, keep):
    _rewrite(good_prefix + ".idx", lambda data: data[:keep])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: (truncated|not a Megatron index file)"):
        IndexedDataset(good_prefix)


def test_bin_shorter_than_index_says(good_prefix):
    _rewrite(good_prefix + ".bin", lambda data: data[:-4])
    with pytest.raises(IndexedDatasetError, match=r"good\.bin: shorter than its index says"):
        IndexedDataset(good_prefix)


def test_corrupt_document_index(good_prefix):
    # Point the last document boundary past the sequence count.
    _rewrite(good_prefix + ".idx", lambda data: data[:-8] + struct.pack("<q", 99))
    with pytest.raises(IndexedDatasetError, match="document index"):
        IndexedDataset(good_prefix)


def test_out_of_range_reads(good_prefix):
    dataset = IndexedDataset(good_prefix)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(IndexError):
        dataset.get(0, offset=0, length=int(dataset.sequence_lengths[0]) + 1)
