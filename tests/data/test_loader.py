"""The MindSpore-facing loader: every data-parallel rank gets its own samples, and a resumed loader
continues the exact stream of an uninterrupted one."""
import numpy as np
import pytest

from conftest import random_documents, write_dataset
from mindpretrain.validation import ConfigError
from mindpretrain.data.dataset_builder import build_gpt_datasets
from mindpretrain.data.loader import BlendedMegatronDatasetDataLoader, DataParallelSamples

SEQ = 8
EOD = 500


@pytest.fixture(scope="module")
def data_section(tmp_path_factory):
    documents = [np.append(doc, EOD) for doc in random_documents(5, 40, max_length=30, vocab=EOD)]
    prefix = write_dataset(tmp_path_factory.mktemp("loader") / "corpus", documents)
    return {"seq_length": SEQ, "seed": 11, "split": "1, 0, 0", "data_path": [prefix], "eod": EOD}


@pytest.fixture(scope="module")
def train(data_section):
    return build_gpt_datasets(data_section, [64, 0, 0])[0]


def rank_stream(dataset, rank, dp_size, micro, consumed=0):
    samples = DataParallelSamples(dataset, ("input_ids",), rank, dp_size, micro, consumed)
    return [samples[i][0] for i in range(len(samples))]


def test_ranks_partition_each_global_batch_in_order(train):
    micro, dp_size = 2, 2
    per_rank = [rank_stream(train, rank, dp_size, micro) for rank in range(dp_size)]
    global_batch = micro * dp_size
    for step in range(len(train) // global_batch):
        expected = [train[step * global_batch + k]["input_ids"] for k in range(global_batch)]
        got = per_rank[0][step * micro:(step + 1) * micro] + per_rank[1][step * micro:(step + 1) * micro]
        for want, have in zip(expected, got):
            np.testing.assert_array_equal(have, want)


def test_resume_continues_the_uninterrupted_stream(train):
    micro, dp_size, steps_done = 2, 2, 5
    for rank in range(dp_size):
        full = rank_stream(train, rank, dp_size, micro)
        resumed = rank_stream(train, rank, dp_size, micro, consumed=steps_done * micro * dp_size)
        assert len(resumed) == len(full) - steps_done * micro
        for want, have in zip(full[steps_done * micro:], resumed):
            np.testing.assert_array_equal(have, want)


def test_mindspore_dataset_yields_the_same_batches(data_section, train):
    loader = BlendedMegatronDatasetDataLoader(
        sizes=[64, 0, 0], config=data_section, column_names=["input_ids", "labels"], dp_rank=1, dp_size=2,
        micro_batch_size=2, consumed_samples=8)
    batches = list(loader.batch(2, drop_remainder=True).create_tuple_iterator(output_numpy=True))
    reference = rank_stream(train, 1, 2, 2, consumed=8)
    assert len(batches) == len(reference) // 2
    for index, (input_ids, labels) in enumerate(batches):
        np.testing.assert_array_equal(input_ids, np.stack(reference[2 * index:2 * index + 2]))
        np.testing.assert_array_equal(input_ids[:, 1:], labels[:, :-1])


@pytest.mark.parametrize("arguments, message", [
    ({"consumed_samples": 3}, r"consumed_samples \(3\) must be a non-negative multiple"),
    ({"dp_rank": 2}, r"dp_rank \(2\) must be in \[0, 2\)"),
    ({"consumed_samples": 10 ** 6}, "must not exceed"),
])
def test_bad_positions_are_refused(train, arguments, message):
    settings = {"dp_rank": 0, "dp_size": 2, "micro_batch_size": 2, "consumed_samples": 0}
    settings.update(arguments)
    with pytest.raises(ConfigError, match=message):
        DataParallelSamples(train, ("input_ids",), **settings)


def test_shuffle_is_refused(data_section):
    with pytest.raises(ConfigError, match="shuffle"):
        BlendedMegatronDatasetDataLoader(sizes=[64, 0, 0], config=data_section, shuffle=True)
