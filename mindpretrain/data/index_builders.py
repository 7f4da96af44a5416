"""The GPT sample index and the blending indices, exactly as Megatron-Core builds them.

Both are sequential walks over a whole corpus (every document of every epoch; every blended
sample), so they run in the C++ extension `mindpretrain.data._index_helpers`: for a
billion-token corpus the walk takes milliseconds there and would take minutes in a Python loop.
When the extension is not built the NumPy fallback is used. It must return byte-identical arrays
(values and dtype), because the indices are cached on disk and shared with Megatron-LM runs: a
machine without a compiler must not train on a different sample order. The sample-index fallback
therefore does not loop; it locates every sample boundary at once with a cumulative token count
and `np.searchsorted`, which is provably the same as the walk (see `_sample_index_numpy`).

Validation happens here, once, for both backends; the C++ side still bounds-checks and raises
rather than read out of bounds.

`backend="auto"` uses C++ when available; tests force `"numpy"` or `"cpp"` to compare the two.
"""
import math
import operator

import numpy as np

try:
    from mindpretrain.data import _index_helpers
    _CPP_IMPORT_ERROR = None
except ImportError as error:
    _index_helpers = None
    _CPP_IMPORT_ERROR = error

HAVE_CPP_HELPERS = _index_helpers is not None
BACKENDS = ("auto", "cpp", "numpy")
INT32_MAX = int(np.iinfo(np.int32).max)
MAX_DATASETS = int(np.iinfo(np.int16).max)


def build_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                       drop_last_partial_sequence=True, add_extra_token_to_sequence=1, backend="auto"):
    """Rows `(position in document_index, token offset in that document)` where each sample starts.

    Sample i runs from row i to row i + 1 plus `add_extra_token_to_sequence` tokens, so consecutive
    samples share that many tokens (the shifted label). Shape `(num_samples + 1, 2)`; int32 unless
    a position or document size exceeds int32, then int64 (the same choice on both backends).
    """
    use_cpp = _resolve_backend(backend)
    sizes = _as_int32_array("sizes", sizes)
    document_index = _as_int32_array("document_index", document_index)
    seq_length = _as_int("seq_length", seq_length, minimum=1)
    num_epochs = _as_int("num_epochs", num_epochs, minimum=1)
    tokens_per_epoch = _as_int("tokens_per_epoch", tokens_per_epoch, minimum=0)
    add_extra = _as_int("add_extra_token_to_sequence", add_extra_token_to_sequence, minimum=0)
    drop_last = bool(drop_last_partial_sequence)
    _check_sizes_and_documents(sizes, document_index)
    num_samples = _num_samples(num_epochs * tokens_per_epoch, seq_length, add_extra, drop_last)
    _check_enough_tokens(sizes, document_index, num_samples, seq_length, add_extra, drop_last)
    max_size = int(sizes.max()) if len(sizes) else 0
    dtype = sample_index_dtype(len(document_index), max_size)
    return _sample_index_with(use_cpp, sizes, document_index, seq_length, num_samples, drop_last,
                              add_extra, dtype)


def build_blending_indices(weights, size, backend="auto"):
    """`(dataset_index int16, dataset_sample_index int64)` for `size` samples blended by `weights`.

    Error-greedy: sample i goes to the dataset d maximising `weight[d] * max(i, 1) - taken[d]`
    (lowest d on ties), computed in float64 so the choice, ties included, matches Megatron-Core.
    Weights are normalised to sum to one first.
    """
    use_cpp = _resolve_backend(backend)
    weights = _normalised_weights(weights)
    size = _as_int("size", size, minimum=0)
    if use_cpp:
        return _index_helpers.build_blending_indices(weights, size)
    return _blending_numpy(weights, size)


def sample_index_dtype(num_positions, max_document_size):
    """int32 halves the cached index's size; int64 only when a stored value could overflow int32."""
    if num_positions <= INT32_MAX and max_document_size <= INT32_MAX:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


# -- backends --------------------------------------------------------------------------------
def _resolve_backend(backend):
    """True for C++. An explicit "cpp" without the extension is an error, not a silent fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp" and not HAVE_CPP_HELPERS:
        raise RuntimeError(f"the C++ index helpers are not built ({_CPP_IMPORT_ERROR}); run "
                           "`python setup.py build_ext --inplace` or `pip install -e .`")
    return backend == "cpp" or (backend == "auto" and HAVE_CPP_HELPERS)


def _sample_index_with(use_cpp, sizes, document_index, seq_length, num_samples, drop_last, add_extra,
                       dtype):
    """The backend call on validated inputs; separate so tests can exercise the int64 layout."""
    if use_cpp:
        return _index_helpers.build_sample_index(sizes, document_index, seq_length, num_samples,
                                                 drop_last, add_extra, dtype == np.int64)
    return _sample_index_numpy(sizes, document_index, seq_length, num_samples, add_extra, dtype)


def _sample_index_numpy(sizes, document_index, seq_length, num_samples, add_extra, dtype):
    """The walk's result without walking.

    Row i >= 1 starts sample i at stream token g = i * seq_length. The walk stops in the first
    document position p whose cumulative end reaches g + add_extra (the end of sample i - 1, extra
    token included) and stores the offset g - start(p): a binary search over cumulative ends. When
    no document reaches it (only the kept partial tail, as validated), the walk parks on the last
    position at `size - add_extra`. Row 0 is (0, 0) regardless of empty leading documents.
    """
    result = np.zeros((num_samples + 1, 2), dtype=dtype)
    if num_samples == 0:
        return result
    lengths = sizes[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    positions = np.searchsorted(ends, starts + add_extra, side="left")
    tail = positions == len(ends)
    positions[tail] = len(ends) - 1
    offsets = starts - (ends[positions] - lengths[positions])
    offsets[tail] = lengths[-1] - add_extra
    result[1:, 0] = positions
    result[1:, 1] = offsets
    return result


def _blending_numpy(weights, size):
    """Plain Python floats: for the usual handful of datasets this is ~3x faster than a NumPy
    argmax per sample, and Python float arithmetic is the same IEEE double arithmetic as C++."""
    weights = weights.tolist()
    taken = [0] * len(weights)
    dataset_index = [0] * size
    dataset_sample_index = [0] * size
    for i in range(size):
        x = max(float(i), 1.0)
        errors = [weight * x - count for weight, count in zip(weights, taken)]
        best = errors.index(max(errors))
        dataset_index[i] = best
        dataset_sample_index[i] = taken[best]
        taken[best] += 1
    return np.array(dataset_index, dtype=np.int16), np.array(dataset_sample_index, dtype=np.int64)


# -- validation ------------------------------------------------------------------------------
def _as_int(name, value, minimum):
    """Rejects floats such as 4096.5 instead of truncating them to a different sample layout."""
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _as_int32_array(name, values):
    """A contiguous int32 copy (or view); refuses values the cast would wrap around."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int32)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if int(array.min()) < np.iinfo(np.int32).min or int(array.max()) > INT32_MAX:
        raise ValueError(f"{name} holds values outside int32")
    return np.ascontiguousarray(array, dtype=np.int32)


def _check_sizes_and_documents(sizes, document_index):
    if len(sizes) and int(sizes.min()) < 0:
        raise ValueError("sizes must be >= 0 (token counts)")
    if len(document_index) and (int(document_index.min()) < 0 or int(document_index.max()) >= len(sizes)):
        raise ValueError(f"document_index holds ids outside [0, {len(sizes)}), the range of sizes")


def _num_samples(total_tokens, seq_length, add_extra, drop_last):
    """Whole samples only when dropping the partial tail, else one more for the tail. Every sample
    reads add_extra tokens past its seq_length, so fewer tokens than that make no sample count."""
    if total_tokens < add_extra:
        raise ValueError(f"num_epochs * tokens_per_epoch = {total_tokens} is less than "
                         f"add_extra_token_to_sequence = {add_extra}")
    usable = total_tokens - add_extra
    return usable // seq_length if drop_last else -(-usable // seq_length)


def _check_enough_tokens(sizes, document_index, num_samples, seq_length, add_extra, drop_last):
    """The walk may run out of documents only in the final sample kept by drop_last=False; if the
    claimed tokens_per_epoch says more than document_index holds, fail here, naming the shortfall."""
    complete = num_samples if drop_last else num_samples - 1
    if num_samples and len(document_index) == 0:
        raise ValueError(f"{num_samples} samples requested from an empty document_index")
    if complete <= 0:
        return
    needed = complete * seq_length + add_extra
    available = int(sizes[document_index].sum(dtype=np.int64))
    if needed > available:
        raise ValueError(f"{num_samples} samples of {seq_length} + {add_extra} tokens need {needed} tokens "
                         f"but document_index holds {available}: num_epochs * tokens_per_epoch "
                         f"overstates the documents' tokens")


def _normalised_weights(weights):
    """float64 weights / their np.sum, as Megatron-Core normalises, after rejecting what would
    make the greedy choice meaningless (NaN never wins a comparison) or overflow int16."""
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {array.shape}")
    if array.size > MAX_DATASETS:
        raise ValueError(f"at most {MAX_DATASETS} datasets can be blended (int16 index), got {array.size}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"weights must be finite and >= 0, got {array.tolist()}")
    total = np.sum(array)
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"weights must have a positive finite sum, got {array.tolist()}")
    return np.ascontiguousarray(array / total)
