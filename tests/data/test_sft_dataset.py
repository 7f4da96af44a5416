"""SFTDataset rows against the contract, recomputed position by position from the documents as written.

Each document carries a unique tag token right after BOS, so a row's documents are recognised from its
tokens alone (not from the dataset's own index) and "each document exactly once per epoch" is checked
from what the rows hold.
"""
import logging

import numpy as np
import pytest

from mindpretrain.validation import ConfigError
from mindpretrain.data.dataset_builder import build_datasets
from mindpretrain.data.indexed_dataset import IndexedDatasetBuilder
from mindpretrain.data.loader import BlendedMegatronDatasetDataLoader, DataParallelSamples
from mindpretrain.data.sft_dataset import SFT_COLUMNS
from conftest import write_sft_dataset
from test_sft_packing import brute_force_bfd, brute_force_sequential

BOS, PAD, SEQ = 7, 3, 32


def write_sft(prefix, count, seed, tag_base, max_length=SEQ):
    """An SFT prefix like the preprocessor's: BOS, a tag, tokens; a uint8 target mask (never BOS)."""
    rng = np.random.RandomState(seed)
    documents = []
    for number in range(count):
        length = int(rng.randint(2, max_length + 1))
        tokens = np.concatenate(([BOS, tag_base + number], rng.randint(10, 900, size=length - 2)))
        mask = (rng.rand(length) < 0.6).astype(np.uint8)
        mask[0] = 0
        documents.append((tokens.astype(np.int32), mask))
    return write_sft_dataset(prefix, documents), documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_sft(tmp_path_factory.mktemp("sft") / "chat", 90, seed=0, tag_base=1000)


def section(prefix, **overrides):
    config = {"seq_length": SEQ, "seed": 11, "split": "1, 0, 0", "data_path": [prefix], "pad_token_id": PAD,
              "pack": True, "pack_strategy": "bfd", "shuffle_before_pack": True}
    config.update(overrides)
    return config


def expected_row(documents, seq_length):
    """The contract, one position at a time."""
    input_ids, labels, loss_mask, position_ids, ends = [], [], [], [], []
    for tokens, mask in documents:
        for j in range(len(tokens)):
            input_ids.append(int(tokens[j]))
            last = j == len(tokens) - 1
            labels.append(-100 if last else int(tokens[j + 1]))
            loss_mask.append(0.0 if last else float(mask[j + 1]))
            position_ids.append(j)
        ends.append(len(input_ids))
    padding = seq_length - len(input_ids)
    return {"input_ids": input_ids + [PAD] * padding, "labels": labels + [-100] * padding,
            "loss_mask": loss_mask + [0.0] * padding, "position_ids": position_ids + [0] * padding,
            "actual_seq_len": ends + [ends[-1]] * (seq_length - len(ends))}


def documents_in_row(row, tag_base):
    """Document numbers of a row, read from its tokens: segments cut at actual_seq_len, tag after BOS."""
    ends = sorted(set(row["actual_seq_len"].tolist()))
    starts = [0] + ends[:-1]
    assert all(row["input_ids"][start] == BOS for start in starts)
    return [int(row["input_ids"][start + 1]) - tag_base for start in starts]


def check_row(row, documents, tag_base, seq_length=SEQ):
    numbers = documents_in_row(row, tag_base)
    expected = expected_row([documents[n] for n in numbers], seq_length)
    assert sorted(row) == sorted(SFT_COLUMNS)
    for column in SFT_COLUMNS:
        assert row[column].shape == (seq_length,)
        assert row[column].dtype == (np.float32 if column == "loss_mask" else np.int32)
        np.testing.assert_array_equal(row[column], expected[column], err_msg=column)
    return numbers


@pytest.mark.parametrize("overrides", [{}, {"pack_strategy": "sequential"}, {"shuffle_before_pack": False},
                                       {"pack": False}, {"seq_length": 48}])
def test_one_epoch_rows_obey_the_contract_and_use_every_document_once(corpus, overrides):
    prefix, documents = corpus
    config = section(prefix, **overrides)
    train = build_datasets(config, [None, 0, 0], "SFTDataset")[0]
    seen = []
    for index in range(len(train)):
        seen += check_row(train[index], documents, 1000, config["seq_length"])
    assert sorted(seen) == list(range(len(documents)))
    if not config["pack"]:
        assert len(train) == len(documents)


@pytest.mark.parametrize("strategy, reference", [("bfd", brute_force_bfd), ("sequential", brute_force_sequential)])
def test_rows_are_the_reference_packing(corpus, strategy, reference):
    prefix, documents = corpus
    train = build_datasets(section(prefix, pack_strategy=strategy), [None, 0, 0], "SFTDataset")[0]
    lengths = np.array([len(tokens) for tokens, _ in documents])
    expected = sorted(reference(lengths, SEQ, shuffle=True, seed=11))
    assert sorted(documents_in_row(train[i], 1000) for i in range(len(train))) == expected


def test_split_keeps_documents_apart(corpus):
    prefix, documents = corpus
    train, valid, _ = build_datasets(section(prefix, split="8, 2, 0"), [None, None, 0], "SFTDataset")
    boundary = int(round(0.8 * len(documents)))
    train_docs = [n for i in range(len(train)) for n in check_row(train[i], documents, 1000)]
    valid_docs = [n for i in range(len(valid)) for n in check_row(valid[i], documents, 1000)]
    assert sorted(train_docs) == list(range(boundary))
    assert sorted(valid_docs) == list(range(boundary, len(documents)))


def test_more_samples_are_further_epochs_each_reshuffled(corpus):
    prefix, documents = corpus
    one_epoch = build_datasets(section(prefix), [None, 0, 0], "SFTDataset")[0]
    rows = len(one_epoch)
    train = build_datasets(section(prefix), [2 * rows + 3, 0, 0], "SFTDataset")[0]
    assert len(train) == 3 * rows
    epochs = [[tuple(documents_in_row(train[e * rows + i], 1000)) for i in range(rows)] for e in range(3)]
    first = [tuple(documents_in_row(one_epoch[i], 1000)) for i in range(rows)]
    assert epochs[0] == first                       # more epochs do not change the first one
    for epoch in epochs:
        assert sorted(n for row in epoch for n in row) == list(range(len(documents)))
        assert sorted(epoch) == sorted(first)       # same rows ...
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1]   # ... in a new order each epoch


def test_cache_hit_gives_identical_rows_and_keys_on_the_packing(corpus):
    prefix, _ = corpus
    first = build_datasets(section(prefix, seed=5), [None, 0, 0], "SFTDataset")[0]
    again = build_datasets(section(prefix, seed=5), [None, 0, 0], "SFTDataset")[0]
    assert again.loaded_from_cache
    for index in range(len(first)):
        for column in SFT_COLUMNS:
            np.testing.assert_array_equal(first[index][column], again[index][column])
    other = build_datasets(section(prefix, seed=5, pack_strategy="sequential"), [None, 0, 0], "SFTDataset")[0]
    assert not other.loaded_from_cache


def test_blend_follows_the_weights(tmp_path):
    first_prefix, first_docs = write_sft(tmp_path / "a", 60, seed=1, tag_base=1000)
    second_prefix, second_docs = write_sft(tmp_path / "b", 60, seed=2, tag_base=5000)
    config = section(first_prefix, data_path=[0.7, first_prefix, 0.3, second_prefix])
    blend = build_datasets(config, [40, 0, 0], "SFTDataset")[0]
    assert len(blend) == 40
    counts = np.zeros(2)
    for index in range(len(blend)):
        row = blend[index]
        member = int(row.pop("dataset_id"))
        check_row(row, (first_docs, second_docs)[member], (1000, 5000)[member])
        counts[member] += 1
        assert np.all(np.abs(counts - np.array([0.7, 0.3]) * (index + 1)) <= 1.0)   # within one at every prefix


def test_loader_resume_and_sharding_give_the_same_stream(corpus):
    prefix, _ = corpus
    config = section(prefix)
    train = build_datasets(config, [48, 0, 0], "SFTDataset")[0]
    full = DataParallelSamples(train, SFT_COLUMNS, dp_rank=1, dp_size=2, micro_batch_size=2)
    loader = BlendedMegatronDatasetDataLoader(sizes=[48, 0, 0], config=config, datasets_type="SFTDataset",
                                              dp_rank=1, dp_size=2, micro_batch_size=2, consumed_samples=8)
    batches = list(loader.batch(2, drop_remainder=True).create_tuple_iterator(output_numpy=True))
    assert len(batches) * 2 == len(full) - 4
    for number, batch in enumerate(batches):
        assert len(batch) == len(SFT_COLUMNS)   # the five contract columns by default
        for offset in range(2):
            want = full[4 + 2 * number + offset]
            for column, have in zip(SFT_COLUMNS, batch):
                np.testing.assert_array_equal(have[offset], want[SFT_COLUMNS.index(column)])


def test_overlong_document_names_its_index_and_length(tmp_path):
    prefix, documents = write_sft(tmp_path / "long", 20, seed=3, tag_base=1000, max_length=40)
    longest = int(np.argmax([len(tokens) for tokens, _ in documents]))
    assert len(documents[longest][0]) > SEQ
    first_long = next(n for n, (tokens, _) in enumerate(documents) if len(tokens) > SEQ)
    with pytest.raises(ConfigError, match=f"document {first_long} has {len(documents[first_long][0])} tokens, "
                                          f"more than seq_length {SEQ}.*--overlong skip or truncate"):
        build_datasets(section(prefix), [None, 0, 0], "SFTDataset")


def test_unknown_keys_are_refused_with_the_known_ones(corpus):
    with pytest.raises(ConfigError, match=r"unknown keys \['pack_stratgy'\]; supported: .*'pack_strategy'"):
        build_datasets(section(corpus[0], pack_stratgy="bfd"), [None, 0, 0], "SFTDataset")
    with pytest.raises(ConfigError, match="pack_strategy"):
        build_datasets(section(corpus[0], pack_strategy="ffd"), [None, 0, 0], "SFTDataset")


def test_mismatched_mask_twin_is_refused(tmp_path):
    prefix, _ = write_sft(tmp_path / "x", 5, seed=4, tag_base=1000)
    with IndexedDatasetBuilder(f"{prefix}_loss_mask_document", np.uint8) as masks_out:
        for _ in range(5):
            masks_out.add_document(np.zeros(3, dtype=np.uint8))
    with pytest.raises(ConfigError, match="disagree on the length of document"):
        build_datasets(section(prefix), [None, 0, 0], "SFTDataset")


def test_packing_efficiency_is_logged_once(tmp_path):
    prefix, documents = write_sft(tmp_path / "log", 30, seed=6, tag_base=1000)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mindpretrain.data")
    logger.addHandler(handler)
    try:
        train = build_datasets(section(prefix), [None, 0, 0], "SFTDataset")[0]
        build_datasets(section(prefix), [None, 0, 0], "SFTDataset")
    finally:
        logger.removeHandler(handler)
    lines = [record.getMessage() for record in records if "packing efficiency" in record.getMessage()]
    tokens = sum(len(tokens) for tokens, _ in documents)
    assert len(lines) == 1
    assert f"packing efficiency {100 * tokens / (len(train) * SEQ):.1f}%" in lines[0]
