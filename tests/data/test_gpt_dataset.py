"""GPTDataset and BlendedDataset samples against two independent references.

1. A brute-force token stream: documents laid end to end in the shuffled order, every sample cut
   from it by plain slicing. This checks the sample index from first principles.
2. Megatron-Core 0.16.1 itself (test-only dependency): every field of every sample equal.
"""
import os

import numpy as np
import pytest

from conftest import random_documents, require_reference, write_dataset
from mindpretrain.validation import ConfigError
from mindpretrain.data import gpt_dataset as gpt
from mindpretrain.data.dataset_builder import build_gpt_datasets
from mindpretrain.data.gpt_dataset import GPTDatasetConfig, make_sample
from mindpretrain.data.indexed_dataset import IndexedDataset, IndexedDatasetError

EOD = 999


def corpus(tmp_path, name="corpus", seed=0, count=60, max_length=40):
    documents = random_documents(seed, count, max_length=max_length, vocab=EOD)
    documents = [np.append(document, EOD) for document in documents]  # every document ends with EOD
    return write_dataset(tmp_path / name, documents, np.int32), documents


def section(prefix, **overrides):
    config = {"seq_length": 16, "random_seed": 1234, "split": "1, 0, 0", "data_path": [prefix],
              "eod": EOD, "path_to_cache": None}
    config.update(overrides)
    return config


# -- reference 1: the token stream ------------------------------------------------------------
def stream_reference(documents, document_ids, num_samples, seq_length, seed, drop_last=True):
    """Samples of `seq_length + 1` tokens, computed by slicing the concatenated document stream."""
    tokens_per_epoch = sum(len(documents[d]) for d in document_ids)
    epochs = 1 if num_samples is None else max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    rng = np.random.RandomState(seed)
    separate = False
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        separate = num_samples - before_final < int(0.8 * ((tokens_per_epoch - 1) // seq_length))
    order = []
    for epoch_block in ([epochs - 1, 1] if separate else [epochs]):
        block = np.tile(np.asarray(document_ids, dtype=np.int32), epoch_block)
        rng.shuffle(block)
        order.extend(block.tolist())
    stream = np.concatenate([documents[d] for d in order])
    total = (len(stream) - 1) // seq_length if drop_last else -(-(len(stream) - 1) // seq_length)
    samples = [stream[i * seq_length: i * seq_length + seq_length + 1] for i in range(total)]
    head = before_final if separate else total
    shuffle = np.arange(head, dtype=np.uint32)
    rng.shuffle(shuffle)
    tail = np.arange(head, total, dtype=np.uint32)
    rng.shuffle(tail)
    return [samples[i] for i in np.concatenate([shuffle, tail])]


@pytest.mark.parametrize("seed, split, num_samples, seq_length", [
    (1234, "1, 0, 0", None, 16),      # one epoch
    (7, "1, 0, 0", 200, 16),          # several epochs, final epoch shuffled with the rest
    (7, "1, 0, 0", 130, 16),          # short final epoch shuffled apart
    (42, "969, 30, 1", 300, 7),       # a split subset, odd sequence length
    (3, "8, 2, 0", 50, 64),           # samples longer than most documents
])
def test_samples_equal_token_stream_reference(tmp_path, seed, split, num_samples, seq_length):
    prefix, documents = corpus(tmp_path)
    config = section(prefix, random_seed=seed, split=split, seq_length=seq_length)
    train = build_gpt_datasets(config, [num_samples, 0, 0])[0]
    fractions = gpt.parse_split(split)
    document_ids = list(range(0, int(round(fractions[0] * len(documents)))))
    expected = stream_reference(documents, document_ids, num_samples, seq_length, seed)
    assert len(train) == len(expected)
    if num_samples is not None:
        assert len(train) >= num_samples
    for index, reference in enumerate(expected):
        np.testing.assert_array_equal(train.tokens(index), reference, err_msg=f"sample {index}")


def test_validation_split_keeps_padded_partial_tail(tmp_path):
    prefix, documents = corpus(tmp_path)
    config = section(prefix, split="0, 1, 0", drop_last_partial_validation_sequence=False)
    valid = build_gpt_datasets(config, [0, None, 0])[1]
    expected = stream_reference(documents, list(range(len(documents))), None, 16, 1234, drop_last=False)
    assert len(valid) == len(expected)
    short = [i for i, tokens in enumerate(expected) if len(tokens) < 17]
    assert len(short) == 1
    sample = valid[short[0]]
    real = len(expected[short[0]])
    np.testing.assert_array_equal(sample["input_ids"][:real], expected[short[0]][:real])
    assert not sample["input_ids"][real:].any() and not sample["loss_mask"][real - 1:].any()
    assert sample["loss_mask"][:real - 1].all()


def test_sample_fields(tmp_path):
    prefix, _ = corpus(tmp_path)
    train = build_gpt_datasets(section(prefix), [None, 0, 0])[0]
    sample = train[3]
    tokens = train.tokens(3)
    assert set(sample) == {"input_ids", "labels", "loss_mask", "position_ids"}
    np.testing.assert_array_equal(sample["input_ids"], tokens[:-1])
    np.testing.assert_array_equal(sample["labels"], tokens[1:])
    np.testing.assert_array_equal(sample["position_ids"], np.arange(16))
    assert sample["input_ids"].dtype == np.int32 and sample["loss_mask"].dtype == np.float32
    assert sample["loss_mask"].all()


def test_masks_reset_at_end_of_document_by_hand():
    config = GPTDatasetConfig(seq_length=6, eod=9, reset_position_ids=True, reset_attention_mask=True,
                              eod_mask_loss=True, create_attention_mask=True)
    sample = make_sample(np.array([5, 9, 6, 7, 9, 8, 4]), config)
    np.testing.assert_array_equal(sample["input_ids"], [5, 9, 6, 7, 9, 8])
    np.testing.assert_array_equal(sample["labels"], [9, 6, 7, 9, 8, 4])
    np.testing.assert_array_equal(sample["position_ids"], [0, 1, 0, 1, 2, 0])
    np.testing.assert_array_equal(sample["loss_mask"], [1, 0, 1, 1, 0, 1])
    allowed = ~sample["attention_mask"][0]
    assert allowed[2, 2] and allowed[3, 2] and not allowed[2, 1] and not allowed[5, 4] and allowed[5, 5]
    assert not allowed[0, 1]  # still causal


# -- reference 2: Megatron-Core ---------------------------------------------------------------
class _Tokenizer:
    """The minimum Megatron-Core's dataset config asks of a tokenizer."""
    eod = EOD
    pad = -1
    vocab_size = EOD + 1
    unique_identifiers = {"class": "TestTokenizer"}


def megatron_build(prefixes_and_weights, split, sizes, seed, seq_length, cache, blend_per_split=None, **flags):
    require_reference("torch")
    builder = require_reference("megatron.core.datasets.blended_megatron_dataset_builder")
    gpt_module = require_reference("megatron.core.datasets.gpt_dataset")
    config = gpt_module.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=prefixes_and_weights,
        blend_per_split=blend_per_split, split=split, tokenizer=_Tokenizer(),
        # No cache: Megatron-Core's cached blend asks torch.distributed for the rank, which needs a process group.
        path_to_cache=None,
        reset_position_ids=flags.get("reset_position_ids", False),
        reset_attention_mask=flags.get("reset_attention_mask", False),
        eod_mask_loss=flags.get("eod_mask_loss", False),
        create_attention_mask=flags.get("create_attention_mask", False),
        drop_last_partial_validation_sequence=flags.get("drop_last_partial_validation_sequence", True))
    return builder.BlendedMegatronDatasetBuilder(gpt_module.GPTDataset, sizes, lambda: True, config).build()


def assert_same_samples(ours, theirs, check_dataset_id=False):
    assert len(ours) == len(theirs)
    for index in range(len(ours)):
        mine, reference = ours[index], theirs[index]
        np.testing.assert_array_equal(mine["input_ids"], reference["tokens"].numpy(), err_msg=f"sample {index}")
        np.testing.assert_array_equal(mine["labels"], reference["labels"].numpy())
        np.testing.assert_array_equal(mine["loss_mask"], reference["loss_mask"].numpy())
        np.testing.assert_array_equal(mine["position_ids"], reference["position_ids"].numpy())
        if "attention_mask" in reference:
            np.testing.assert_array_equal(mine["attention_mask"], reference["attention_mask"].numpy())
        if check_dataset_id:
            assert int(mine["dataset_id"]) == int(reference["dataset_id"])


@pytest.mark.parametrize("case", [
    # 1000 documents, so that the 0.1 % test split holds one (Megatron-Core loops forever on an empty split).
    dict(seed=1234, split="969, 30, 1", sizes=[150, 20, 5], seq_length=16, count=1000),
    dict(seed=5, split="6,3,1", sizes=[400, 40, 10], seq_length=9,
         flags=dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True,
                    create_attention_mask=True, drop_last_partial_validation_sequence=False)),
])
def test_single_dataset_equals_megatron_core(tmp_path, case):
    prefix, _ = corpus(tmp_path, count=case.get("count", 80))
    flags = case.get("flags", {})
    theirs = megatron_build(([prefix], None), case["split"], case["sizes"], case["seed"], case["seq_length"],
                            tmp_path / "megatron_cache", **flags)
    ours = build_gpt_datasets(section(prefix, random_seed=case["seed"], split=case["split"],
                                      seq_length=case["seq_length"], **flags), case["sizes"])
    for mine, reference in zip(ours, theirs):
        assert (mine is None) == (reference is None)
        if mine is not None:
            assert_same_samples(mine, reference)


def test_blend_equals_megatron_core(tmp_path):
    prefix_a, _ = corpus(tmp_path, "a", seed=1, count=50)
    prefix_b, _ = corpus(tmp_path, "b", seed=2, count=90)
    prefix_c, _ = corpus(tmp_path, "c", seed=3, count=30, max_length=80)
    weights = [0.2, 0.5, 0.3]
    theirs = megatron_build(([prefix_a, prefix_b, prefix_c], weights), "90,10,0", [333, 31, 0], 99, 12,
                            tmp_path / "megatron_cache")
    data_path = ["0.2", prefix_a, "0.5", prefix_b, "0.3", prefix_c]
    ours = build_gpt_datasets(section(prefix_a, data_path=data_path, split="90,10,0", random_seed=99,
                                      seq_length=12), [333, 31, 0])
    assert ours[2] is None and theirs[2] is None
    for mine, reference in zip(ours[:2], theirs[:2]):
        assert_same_samples(mine, reference, check_dataset_id=True)


def test_blend_per_split_equals_megatron_core(tmp_path):
    prefix_a, _ = corpus(tmp_path, "a", seed=4, count=40)
    prefix_b, _ = corpus(tmp_path, "b", seed=5, count=40)
    theirs = megatron_build(None, None, [120, 30, 0], 11, 10, tmp_path / "megatron_cache",
                            blend_per_split=[([prefix_a, prefix_b], [1.0, 3.0]), ([prefix_b], None), None])
    ours = build_gpt_datasets({"seq_length": 10, "random_seed": 11, "split": None, "eod": EOD,
                               "train_data_path": ["1", prefix_a, "3", prefix_b], "valid_data_path": [prefix_b]},
                              [120, 30, 0])
    assert ours[2] is None
    assert_same_samples(ours[0], theirs[0], check_dataset_id=True)
    assert_same_samples(ours[1], theirs[1])


# -- blending proportions -------------------------------------------------------------------------
def test_blend_proportions_follow_weights_at_every_prefix(tmp_path):
    prefixes = [corpus(tmp_path, f"p{i}", seed=i, count=40)[0] for i in range(3)]
    weights = [1, 2, 5]
    data_path = [value for weight, prefix in zip(weights, prefixes) for value in (weight, prefix)]
    train = build_gpt_datasets(section(prefixes[0], data_path=data_path), [800, 0, 0])[0]
    assert len(train) == 800
    counts = np.zeros(3)
    for index in range(len(train)):
        counts[int(train.dataset_index[index])] += 1
        expected = np.array(weights) / 8 * (index + 1)
        assert np.all(np.abs(counts - expected) <= 1.0 + 1e-9), (index, counts, expected)
    assert int(train[5]["dataset_id"]) == int(train.dataset_index[5])


# -- the index cache ------------------------------------------------------------------------------
def test_second_open_loads_cache_without_rebuilding(tmp_path, monkeypatch):
    prefix, _ = corpus(tmp_path)
    config = section(prefix, path_to_cache=str(tmp_path / "cache"))
    first = build_gpt_datasets(config, [100, 0, 0])[0]
    assert not first.loaded_from_cache
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 4 and all(".tmp" not in name for name in files)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the sample index was rebuilt although the cache matches")

    monkeypatch.setattr(gpt, "build_sample_index", no_rebuild)
    second = build_gpt_datasets(config, [100, 0, 0])[0]
    assert second.loaded_from_cache
    for index in range(len(first)):
        np.testing.assert_array_equal(first.tokens(index), second.tokens(index))
    with pytest.raises(AssertionError, match="rebuilt"):
        build_gpt_datasets(dict(config, random_seed=1), [100, 0, 0])  # another seed is another cache


def test_regenerated_dataset_invalidates_cache(tmp_path):
    prefix, _ = corpus(tmp_path, seed=0)
    config = section(prefix)  # default cache directory, next to the data
    build_gpt_datasets(config, [50, 0, 0])
    assert os.path.isdir(tmp_path / "cache" / "GPTDataset_indices")
    prefix, documents = corpus(tmp_path, seed=1)  # same prefix, new content
    rebuilt = build_gpt_datasets(config, [50, 0, 0])[0]
    assert not rebuilt.loaded_from_cache
    expected = stream_reference(documents, list(range(len(documents))), 50, 16, 1234)
    np.testing.assert_array_equal(rebuilt.tokens(0), expected[0])


# -- bad configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, sizes, message", [
    (dict(seq_length=0), [10, 0, 0], r"seq_length \(0\) must be a positive integer"),
    (dict(split="a,b"), [10, 0, 0], r"split \('a,b'\) must be up to three"),
    (dict(split="0, 1, 0"), [10, 0, 0], None),
    (dict(data_path=["x", "y"]), [10, 0, 0], r"'x' at position 0 is not a number"),
    (dict(data_path=["1", "p", "2"]), [10, 0, 0], "must alternate weights and prefixes"),
    (dict(data_path=["-1", "p"]), [10, 0, 0], r"must be a finite, positive weight"),
    (dict(eod=-1, eod_mask_loss=True), [10, 0, 0], "must be the end-of-document token id"),
    (dict(bogus=1), [10, 0, 0], r"unknown keys \['bogus'\]"),
    (dict(), [10, 0], r"must list three sample counts"),
    (dict(), [-1, 0, 0], "must be a non-negative integer or null"),
])
def test_bad_configs_are_named(tmp_path, overrides, sizes, message):
    prefix, _ = corpus(tmp_path)
    config = section(prefix, **overrides)
    if message is None:  # a split that requests train samples from an empty train split
        assert build_gpt_datasets(config, sizes)[0] is None
        return
    with pytest.raises(ConfigError, match=message):
        build_gpt_datasets(config, sizes)


def test_missing_prefix_and_tiny_corpus(tmp_path):
    with pytest.raises(IndexedDatasetError, match="file not found"):
        build_gpt_datasets(section(str(tmp_path / "absent")), [10, 0, 0])
    prefix = write_dataset(tmp_path / "tiny", [np.array([1, 2, 3])], np.int32)
    with pytest.raises(ConfigError, match="fewer than one sample"):
        build_gpt_datasets(section(prefix, seq_length=8), [None, 0, 0])
    prefix = write_dataset(tmp_path / "one", [np.arange(100)], np.int32)
    with pytest.raises(ConfigError, match="leaves no documents"):
        build_gpt_datasets(section(prefix, split="99, 1, 0"), [None, None, 0])  # the one document is train's


def test_indexed_dataset_is_shared_between_splits(tmp_path):
    prefix, _ = corpus(tmp_path)
    train, valid, _ = build_gpt_datasets(section(prefix, split="8,2,0"), [20, 5, 0])
    assert train.dataset is valid.dataset and isinstance(train.dataset, IndexedDataset)
    assert set(train.documents).isdisjoint(valid.documents)
