"""The sample and blending indices decide which tokens every training step sees and are shared with
Megatron-LM through the on-disk cache, so both backends are checked against references written
from the specification, not against each other only."""
import os

import numpy as np
import pytest

from conftest import require_reference
from mindpretrain.data import index_builders
from mindpretrain.data.index_builders import build_blending_indices, build_sample_index

requires_cpp = pytest.mark.skipif(
    not index_builders.HAVE_CPP_HELPERS,
    reason="C++ extension mindpretrain.data._index_helpers is not built "
           "(python setup.py build_ext --inplace)")
BACKENDS = ["numpy", pytest.param("cpp", marks=requires_cpp)]


# -- references ------------------------------------------------------------------------------
def walk_reference(sizes, document_index, seq_length, num_samples, add_extra):
    """The specified walk, transcribed literally in Python (the spec for both backends)."""
    rows = [(0, 0)]
    position, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + add_extra
        while remaining != 0:
            size = int(sizes[document_index[position]])
            available = size - offset
            remaining -= available
            if remaining <= 0:
                offset += remaining + available - add_extra
                remaining = 0
            elif position == len(document_index) - 1:
                offset = size - add_extra
                break
            else:
                position += 1
                offset = 0
        rows.append((position, offset))
    return np.array(rows, dtype=np.int64)


def stream_reference(sizes, document_index, seq_length, num_samples, add_extra):
    """From the token stream: sample i-1 ends with token t = i * seq_length + add_extra - 1 (its
    extra token included); row i names the document holding t and where sample i (token
    i * seq_length) starts, counted in that document's offsets. With add_extra = 1 that is simply
    the position of token i * seq_length. A kept partial tail, whose t lies past the stream, is
    pinned to (last position, its size - add_extra), -1 for an empty last document; row 0 is (0, 0)
    even when leading documents are empty."""
    lengths = sizes[document_index].astype(np.int64)
    token_position = np.repeat(np.arange(len(lengths)), lengths)
    token_offset = np.concatenate([np.arange(length) for length in lengths] + [np.zeros(0, np.int64)])
    rows = [(0, 0)]
    for i in range(1, num_samples + 1):
        last = i * seq_length + add_extra - 1
        if last >= len(token_position):
            rows.append((len(lengths) - 1, lengths[-1] - add_extra))
        else:
            rows.append((token_position[last], token_offset[last] + 1 - add_extra))
    return np.array(rows, dtype=np.int64)


def expected_num_samples(total_tokens, seq_length, add_extra, drop_last):
    usable = total_tokens - add_extra
    return usable // seq_length if drop_last else -(-usable // seq_length)


def random_corpus(seed):
    """Sizes with many 0- and 1-token documents, several epochs, shuffled like GPTDataset does."""
    rng = np.random.RandomState(seed)
    num_documents = rng.randint(1, 25)
    sizes = rng.choice([0, 1, 2, 3, 7, 20], size=num_documents).astype(np.int32)
    sizes[rng.randint(num_documents)] += rng.randint(1, 30)
    num_epochs = rng.randint(1, 4)
    document_index = np.random.RandomState(seed).permutation(
        np.tile(np.arange(num_documents, dtype=np.int32), num_epochs))
    seq_length = int(rng.choice([1, 2, 3, rng.randint(1, 2 * int(sizes.max()) + 3)]))
    return sizes, document_index, seq_length, num_epochs


def corpus_cases(seeds):
    for seed in seeds:
        for drop_last in (True, False):
            for add_extra in (0, 1):
                yield (seed, drop_last, add_extra)


# -- sample index ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed,drop_last,add_extra", list(corpus_cases(range(60))))
def test_sample_index_matches_walk_and_token_stream(seed, drop_last, add_extra):
    sizes, document_index, seq_length, num_epochs = random_corpus(seed)
    tokens_per_epoch = int(sizes.sum())
    num_samples = expected_num_samples(num_epochs * tokens_per_epoch, seq_length, add_extra, drop_last)
    walk = walk_reference(sizes, document_index, seq_length, num_samples, add_extra)
    np.testing.assert_array_equal(walk, stream_reference(sizes, document_index, seq_length, num_samples,
                                                         add_extra))
    backends = ["numpy", "cpp"] if index_builders.HAVE_CPP_HELPERS else ["numpy"]
    for backend in backends:
        result = build_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                                    drop_last_partial_sequence=drop_last,
                                    add_extra_token_to_sequence=add_extra, backend=backend)
        assert result.dtype == np.int32, backend
        np.testing.assert_array_equal(result, walk, err_msg=backend)


@requires_cpp
@pytest.mark.parametrize("seed,drop_last,add_extra", list(corpus_cases(range(100, 140))))
def test_cpp_and_numpy_sample_index_are_identical(seed, drop_last, add_extra):
    rng = np.random.RandomState(seed)
    sizes = rng.choice([0, 1, rng.randint(2, 500)], size=2000, p=[0.1, 0.1, 0.8]).astype(np.int32)
    num_epochs = rng.randint(1, 4)
    document_index = np.random.RandomState(seed).permutation(np.tile(np.arange(2000, dtype=np.int32), num_epochs))
    seq_length = int(rng.choice([1, rng.randint(2, 64), 4096]))
    args = (sizes, document_index, seq_length, num_epochs, int(sizes.sum()), drop_last, add_extra)
    cpp = build_sample_index(*args, backend="cpp")
    fallback = build_sample_index(*args, backend="numpy")
    assert cpp.dtype == fallback.dtype
    np.testing.assert_array_equal(cpp, fallback)
    np.testing.assert_array_equal(build_sample_index(*args), cpp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,seq_length,add_extra,drop_last,expected", [
    # a sample ending exactly at a document end keeps pointing into that document
    ([4, 4], 3, 1, True, [[0, 0], [0, 3], [1, 2]]),
    ([4, 4], 3, 1, False, [[0, 0], [0, 3], [1, 2], [1, 3]]),
    ([3, 3], 3, 0, True, [[0, 0], [0, 3], [1, 3]]),
    # empty documents are stepped over, except the leading ones in row 0
    ([0, 2, 0, 0, 3], 2, 1, True, [[0, 0], [4, 0], [4, 2]]),
    # the kept partial tail parks on the last position even when that document is empty
    ([3, 0], 4, 1, False, [[0, 0], [1, -1]]),
])
def test_sample_index_boundaries(backend, sizes, seq_length, add_extra, drop_last, expected):
    sizes = np.array(sizes, dtype=np.int32)
    document_index = np.arange(len(sizes), dtype=np.int32)
    result = build_sample_index(sizes, document_index, seq_length, 1, int(sizes.sum()),
                                drop_last_partial_sequence=drop_last, add_extra_token_to_sequence=add_extra,
                                backend=backend)
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_layout_holds_the_same_values(backend):
    sizes, document_index, seq_length, _ = random_corpus(7)
    num_samples = expected_num_samples(int(sizes[document_index].sum()), seq_length, 1, False)
    use_cpp = backend == "cpp"
    narrow = index_builders._sample_index_with(use_cpp, sizes, document_index, seq_length, num_samples,
                                               False, 1, np.dtype(np.int32))
    wide = index_builders._sample_index_with(use_cpp, sizes, document_index, seq_length, num_samples,
                                             False, 1, np.dtype(np.int64))
    assert wide.dtype == np.int64
    np.testing.assert_array_equal(wide, narrow)


def test_sample_index_dtype_widens_only_past_int32():
    limit = index_builders.INT32_MAX
    assert index_builders.sample_index_dtype(limit, limit) == np.int32
    assert index_builders.sample_index_dtype(limit + 1, 10) == np.int64
    assert index_builders.sample_index_dtype(10, limit + 1) == np.int64


def test_zero_samples_is_a_single_row():
    result = build_sample_index(np.array([3], np.int32), np.array([0], np.int32), 8, 1, 3, backend="numpy")
    np.testing.assert_array_equal(result, [[0, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change,message", [
    ({"seq_length": -1}, "seq_length"),
    ({"seq_length": 0}, "seq_length"),
    ({"seq_length": 2.5}, "seq_length"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"tokens_per_epoch": 100}, "overstates"),
    ({"tokens_per_epoch": 0}, "less than add_extra"),
    ({"document_index": [0, 3]}, "outside"),
    ({"sizes": [5, -1, 5]}, ">= 0"),
    ({"sizes": [5, 2**31, 5]}, "int32"),
    ({"sizes": [[5, 5, 5]]}, "1-D"),
    ({"sizes": [5.0, 5.0, 5.0]}, "integers"),
])
def test_sample_index_rejects_bad_input(backend, change, message):
    args = {"sizes": [5, 5, 5], "document_index": [0, 1, 2], "seq_length": 4, "num_epochs": 1,
            "tokens_per_epoch": 15}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        build_sample_index(**args, backend=backend)


@requires_cpp
def test_cpp_walk_refuses_to_read_out_of_bounds():
    """Called directly, without the Python validation, the extension must raise, not crash."""
    helpers = index_builders._index_helpers
    sizes = np.array([5, 5], np.int32)
    with pytest.raises(IndexError, match="document id"):
        helpers.build_sample_index(sizes, np.array([0, 9], np.int32), 4, 2, True, 1, False)
    with pytest.raises(ValueError, match="ran out of tokens"):
        helpers.build_sample_index(sizes, np.array([0, 1], np.int32), 4, 5, True, 1, False)
    with pytest.raises(ValueError, match="ran out of tokens"):
        helpers.build_sample_index(sizes, np.array([0, 1], np.int32), 4, 5, False, 1, False)
    with pytest.raises(IndexError, match="outside the document index"):
        helpers.build_sample_index(sizes, np.zeros(0, np.int32), 4, 1, False, 1, False)


# -- Megatron-Core itself, when installed (CI installs it) ----------------------------------
@pytest.fixture(scope="module")
def megatron_helpers():
    return require_reference("megatron.core.datasets.helpers_cpp")


@pytest.mark.parametrize("seed,drop_last,add_extra", list(corpus_cases(range(200, 230))))
def test_sample_index_equals_megatron_core(megatron_helpers, seed, drop_last, add_extra):
    sizes, document_index, seq_length, num_epochs = random_corpus(seed)
    seq_length = max(seq_length, 2)  # Megatron-Core asserts seq_length > 1
    tokens_per_epoch = int(sizes.sum())
    theirs = megatron_helpers.build_sample_idx_int32(sizes, document_index, seq_length, num_epochs,
                                                     tokens_per_epoch, drop_last, add_extra)
    ours = build_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                              drop_last_partial_sequence=drop_last, add_extra_token_to_sequence=add_extra)
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [[0.5, 0.25, 0.25], [1, 1, 1], [0, 1], [1 / 3, 2 / 3],
                                     list(np.random.RandomState(2).random_sample(17))])
def test_blending_equals_megatron_core(megatron_helpers, backend, weights):
    size = 5000
    normalised = np.asarray(weights, np.float64) / np.sum(np.asarray(weights, np.float64))
    dataset_index = np.zeros(size, np.int16)
    dataset_sample_index = np.zeros(size, np.int64)
    megatron_helpers.build_blending_indices(dataset_index, dataset_sample_index, normalised, len(weights), size,
                                            False)
    ours = build_blending_indices(weights, size, backend=backend)
    np.testing.assert_array_equal(ours[0], dataset_index)
    np.testing.assert_array_equal(ours[1], dataset_sample_index)


# -- blending --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [[0.5, 0.25, 0.25], [2, 1, 1]])
def test_blending_hand_computed(backend, weights):
    # i:     0    1    2    3    4    5    6    7   (ties, e.g. i=1 and i=4, go to the lowest dataset)
    dataset_index, sample_index = build_blending_indices(weights, 8, backend=backend)
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64
    np.testing.assert_array_equal(dataset_index, [0, 1, 2, 0, 0, 1, 2, 0])
    np.testing.assert_array_equal(sample_index, [0, 0, 0, 1, 2, 1, 1, 3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(5))
def test_blending_tracks_weights(backend, seed):
    rng = np.random.RandomState(seed)
    weights = rng.random_sample(rng.randint(2, 8))
    size = 10000
    dataset_index, sample_index = build_blending_indices(weights, size, backend=backend)
    counts = np.bincount(dataset_index, minlength=len(weights))
    assert np.all(np.abs(counts - weights / weights.sum() * size) <= 1)
    for dataset, count in enumerate(counts):
        np.testing.assert_array_equal(sample_index[dataset_index == dataset], np.arange(count))


@requires_cpp
@pytest.mark.parametrize("weights", [
    [1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], [0, 1], [1, 0, 3], [1e-12, 1], [1 / 3, 1 / 3, 1 / 3],
    list(np.random.RandomState(0).random_sample(300)),
    list(np.random.RandomState(1).random_sample(3)),
])
def test_cpp_and_numpy_blending_are_identical(weights):
    cpp = build_blending_indices(weights, 3000, backend="cpp")
    fallback = build_blending_indices(weights, 3000, backend="numpy")
    for ours, theirs in zip(cpp, fallback):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights,size,message", [
    ([], 10, "non-empty"),
    ([1.0, float("nan")], 10, "finite"),
    ([1.0, float("inf")], 10, "finite"),
    ([1.0, -0.5], 10, ">= 0"),
    ([0.0, 0.0], 10, "positive"),
    ([1.0] * 32768, 10, "32767"),
    ([1.0], -1, "size"),
])
def test_blending_rejects_bad_input(backend, weights, size, message):
    with pytest.raises(ValueError, match=message):
        build_blending_indices(weights, size, backend=backend)


# -- backend selection -----------------------------------------------------------------------
def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        build_blending_indices([1.0], 1, backend="fortran")


def test_explicit_cpp_without_extension_fails_loudly(monkeypatch):
    monkeypatch.setattr(index_builders, "HAVE_CPP_HELPERS", False)
    with pytest.raises(RuntimeError, match="not built"):
        build_blending_indices([1.0], 1, backend="cpp")


@pytest.mark.skipif(os.environ.get("MINDPRETRAIN_REQUIRE_CPP") != "1",
                    reason="only enforced when MINDPRETRAIN_REQUIRE_CPP=1 (CI sets it)")
def test_cpp_extension_is_built_when_required():
    assert index_builders.HAVE_CPP_HELPERS, (
        f"MINDPRETRAIN_REQUIRE_CPP=1 but mindpretrain.data._index_helpers does not import "
        f"({index_builders._CPP_IMPORT_ERROR})")
