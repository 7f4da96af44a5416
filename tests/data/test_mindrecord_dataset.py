"""MindFormers' MindRecord finetune data read as SFT rows.

The reference is MindFormers' own arithmetic, written out here: its model takes `tokens = input_ids[:-1]`,
`labels = labels[1:]` and trains where `labels != -100` and `tokens != pad_token_id`
(mindformers' causal-LM `construct`). Records are written the way research/deepseek3/deepseek3_preprocess.py
writes them: input_ids and labels of seq_length + 1 tokens, padded, -100 on BOS, prompt and padding.
"""
import numpy as np
import pytest

from conftest import write_mindrecord

from mindpretrain.validation import ConfigError
from mindpretrain.data import mindrecord_dataset
from mindpretrain.data.loader import DataParallelSamples, MindDataset
from mindpretrain.data.mindrecord_dataset import MindRecordDataset, find_mindrecord_files
from mindpretrain.data.sft_dataset import SFT_COLUMNS

SEQ, PAD, BOS = 24, 2, 1


def finetune_records(count, seed, length=SEQ + 1, with_labels=True):
    """Conversations of BOS + prompt + answer + EOS(=PAD, as DeepSeek-V3's finetune YAML sets it), padded."""
    rng = np.random.RandomState(seed)
    records = []
    for _ in range(count):
        prompt, answer = rng.randint(1, 8), rng.randint(1, 10)
        real = np.concatenate(([BOS], rng.randint(10, 500, prompt + answer), [PAD]))[:length]
        input_ids = np.full(length, PAD, dtype=np.int32)
        input_ids[:len(real)] = real
        labels = np.full(length, -100, dtype=np.int32)
        labels[1 + prompt:len(real)] = real[1 + prompt:]
        records.append({"input_ids": input_ids, "labels": labels} if with_labels else {"input_ids": input_ids})
    return records


def mindformers_row(record, pad_token_id):
    """What MindFormers' model trains on for one record."""
    tokens = record["input_ids"][:-1]
    labels = record.get("labels", record["input_ids"])[1:]
    mask = (labels != -100) & (tokens != pad_token_id)
    return tokens, labels, mask


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    records = finetune_records(30, seed=0)
    return write_mindrecord(tmp_path_factory.mktemp("mr") / "alpaca.mindrecord", records), records


def test_rows_reproduce_mindformers_shift_and_mask(written):
    path, records = written
    dataset = MindRecordDataset([path], pad_token_id=PAD)
    assert dataset.seq_length == SEQ and len(dataset) == len(records)
    for index, record in enumerate(records):   # one shard: MindSpore's order is the written order
        row = dataset[index]
        tokens, labels, mask = mindformers_row(record, PAD)
        assert sorted(row) == sorted(SFT_COLUMNS)
        np.testing.assert_array_equal(row["input_ids"], tokens)
        np.testing.assert_array_equal(row["loss_mask"], mask.astype(np.float32))
        np.testing.assert_array_equal(row["labels"][mask], labels[mask])
        np.testing.assert_array_equal(row["labels"], record["input_ids"][1:])   # next token, all in one document
        np.testing.assert_array_equal(row["position_ids"], np.arange(SEQ))
        np.testing.assert_array_equal(row["actual_seq_len"], np.full(SEQ, SEQ))


def test_records_without_labels_train_on_every_next_non_pad_token(tmp_path):
    records = finetune_records(5, seed=1, with_labels=False)
    dataset = MindRecordDataset([write_mindrecord(tmp_path / "wiki.mindrecord", records)], pad_token_id=PAD)
    for index, record in enumerate(records):
        tokens, labels, mask = mindformers_row(record, PAD)
        np.testing.assert_array_equal(dataset[index]["loss_mask"], mask.astype(np.float32))
        np.testing.assert_array_equal(dataset[index]["labels"], labels)


def test_shorter_records_are_padded_and_longer_ones_refused(tmp_path):
    records = finetune_records(4, seed=2, length=11)
    path = write_mindrecord(tmp_path / "short.mindrecord", records)
    row = MindRecordDataset([path], seq_length=16, pad_token_id=PAD)[0]
    tokens, labels, mask = mindformers_row(records[0], PAD)
    np.testing.assert_array_equal(row["input_ids"], np.concatenate((tokens, np.full(6, PAD))))
    np.testing.assert_array_equal(row["loss_mask"], np.concatenate((mask, np.zeros(6))))
    np.testing.assert_array_equal(row["labels"][10:], np.full(6, -100))
    np.testing.assert_array_equal(row["position_ids"], np.concatenate((np.arange(10), np.zeros(6))))
    np.testing.assert_array_equal(row["actual_seq_len"], np.full(16, 10))
    with pytest.raises(ConfigError, match="record 0 .* has 11 tokens, more than seq_length 8 \\+ 1"):
        MindRecordDataset([path], seq_length=8)


def test_sharded_files_keep_mindspores_order(tmp_path):
    import mindspore.dataset as msd

    records = finetune_records(20, seed=3)
    first = write_mindrecord(tmp_path / "set.mindrecord", records, shard_num=3)
    files = find_mindrecord_files(dataset_dir=str(tmp_path))
    assert [f.rsplit("/", 1)[1] for f in files] == ["set.mindrecord0", "set.mindrecord1", "set.mindrecord2"]
    reference = [r["input_ids"] for r in msd.MindDataset(files, shuffle=False).create_dict_iterator(
        output_numpy=True)]
    dataset = MindRecordDataset(files)
    assert len(dataset) == 20
    for index, input_ids in enumerate(reference):
        np.testing.assert_array_equal(dataset.record(index)[0], input_ids)
    assert len(MindRecordDataset([first])) == 20   # one file of a set stands for the set


def test_cache_serves_the_records_without_reading_the_files_again(written, monkeypatch):
    path, records = written
    MindRecordDataset([path])
    monkeypatch.setattr(mindrecord_dataset, "read_records", lambda files: pytest.fail("cache was not used"))
    again = MindRecordDataset([path], pad_token_id=PAD)
    np.testing.assert_array_equal(again.record(7)[0], records[7]["input_ids"])
    np.testing.assert_array_equal(again.record(7)[1], records[7]["labels"])


def test_shuffle_and_epochs(written):
    path, records = written
    dataset = MindRecordDataset([path], num_samples=70, shuffle=True, seed=9)
    assert len(dataset) == 90
    epochs = [[int(dataset[e * 30 + i]["input_ids"][3]) for i in range(30)] for e in range(3)]
    written_order = sorted(int(r["input_ids"][3]) for r in records)
    assert all(sorted(epoch) == written_order for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    ordered = MindRecordDataset([path], num_samples=31)
    assert [int(ordered[i]["input_ids"][3]) for i in (0, 30)] == [int(records[0]["input_ids"][3])] * 2


def test_loader_shards_and_resumes(written):
    path, _ = written
    dataset = MindRecordDataset([path], pad_token_id=PAD)
    full = DataParallelSamples(dataset, SFT_COLUMNS, dp_rank=0, dp_size=2, micro_batch_size=3)
    loader = MindDataset(dataset_dir=path, shuffle=False, pad_token_id=PAD, sizes=[None, 0, 0], dp_rank=0,
                         dp_size=2, micro_batch_size=3, consumed_samples=6)
    batches = list(loader.batch(3, drop_remainder=True).create_tuple_iterator(output_numpy=True))
    assert len(batches) == 4 and len(full) == 15
    for number, batch in enumerate(batches):
        for offset in range(3):
            want = full[3 + 3 * number + offset]
            for have, expected in zip(batch, want):
                np.testing.assert_array_equal(have[offset], expected)


def test_bad_sections_are_refused(tmp_path, written):
    with pytest.raises(ConfigError, match=r"unknown keys \['colums_list'\]; supported: .*'dataset_dir'"):
        MindDataset(dataset_dir=written[0], colums_list=["input_ids"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="dataset_dir .* must be a .mindrecord file or a directory"):
        MindDataset(dataset_dir=str(tmp_path / "empty"))
