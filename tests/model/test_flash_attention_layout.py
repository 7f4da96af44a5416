"""The flash-attention (TND) input preparation of research/deepseek3/flash_attention.py, checked on CPU.

The real FlashAttentionScore kernel never ran here: it exists on Ascend only. What is checked instead:
  * the TND conversion round-trips and orders tokens as t = b*S + s;
  * the flattened cumulative lengths equal a brute-force construction from the document id of every position
    (several rows, padding, a row with one document, full rows without padding, data-parallel shards), in
    the NumPy and the MindSpore-op versions;
  * a NumPy reference of "attention in TND, causal within the segments those lengths cut" equals the CPU
    model's packed attention (the explicit block-diagonal mask) on the same q/k/v, so the layout means what
    the mask means;
  * the kernel call is monkeypatched with that reference (which also checks the call against the kernel's
    documented contract: dtype, shapes, sparse_mode, the 2048 x 2048 mask, the lists), so the whole cell and
    the whole model run on CPU end to end;
  * the switch (use_flash_attention on Ascend only, a notice elsewhere) and the shard strategies.
"""
import logging

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor
from mindspore.ops import Primitive
from mindspore.ops.operations.nn_ops import FlashAttentionScore

from mindpretrain.parallel.parallel_config import ParallelConfig
from mindpretrain.parallel.strategies import apply_shard_strategies, plan_shard_calls
from mindpretrain.validation import ConfigError
from research.deepseek3 import flash_attention as fa
from research.deepseek3 import mla
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
from research.deepseek3.rope import softmax_scale
from research.deepseek3.spec import SHARD_TABLE

from conftest import packed_tiny_config  # noqa: E402

SEQ = 24
TINY = packed_tiny_config(SEQ)
# documents per row (lengths): two + padding, one + padding, three filling the row, one filling the row
ROWS = ((9, 7), (11,), (10, 6, 8), (24,))
HALF_TOLERANCE = 5e-3           # the kernel runs in float16: q/k/v rounded to 11 bits


@pytest.fixture(scope="module", autouse=True)
def pynative_cpu():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")


def row_ends(lengths, seq_length=SEQ):
    """One row's actual_seq_len as the SFT contract writes it: cumulative ends padded with the last one."""
    ends = list(np.cumsum(lengths))
    return ends + [ends[-1]] * (seq_length - len(ends))


def actual_seq_len_of(rows, seq_length=SEQ):
    return np.array([row_ends(lengths, seq_length) for lengths in rows], np.int32)


# ---------------------------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------------------------

def brute_force_segments(actual_seq_len, seq_length, slots, rows_per_shard):
    """From the document id of every position (the number of ends <= p, the padding one id of its own): each
    row's runs of equal ids -> cumulative run ends, then S up to `slots` entries, offset by the rows before it
    in its shard."""
    flat = []
    for row, ends in enumerate(actual_seq_len):
        ids = [sum(1 for end in ends if end <= position) for position in range(seq_length)]
        cut = [position + 1 for position in range(seq_length) if position == seq_length - 1
               or ids[position + 1] != ids[position]]
        assert len(cut) <= slots, "the brute force is only defined for rows that fit"
        cut += [seq_length] * (slots - len(cut))
        flat += [end + (row % rows_per_shard) * seq_length for end in cut]
    return np.array(flat, np.int32)


def reference_tnd_attention(query, key, value, cumulative, scale):
    """float64 [T, N, Dv]: for each segment [start, end) of `cumulative` (repeats = empty segments), causal
    softmax(scale q k^T) v per head, nothing across segments."""
    query, key, value = (np.asarray(item, np.float64) for item in (query, key, value))
    out = np.zeros(query.shape[:2] + (value.shape[-1],))
    start = 0
    for end in np.asarray(cumulative):
        if end > start:
            scores = np.einsum("ind,jnd->nij", query[start:end], key[start:end]) * scale
            causal = np.tril(np.ones((end - start, end - start), bool))
            scores = np.where(causal[None], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[start:end] = np.einsum("nij,jnd->ind", probs, value[start:end])
        start = max(start, int(end))
    return out


def tnd_np(x):
    """[B, N, S, D] -> [B*S, N, D] written out independently of the module."""
    batch, heads, seq, dim = x.shape
    out = np.empty((batch * seq, heads, dim), x.dtype)
    for b in range(batch):
        for s in range(seq):
            out[b * seq + s] = x[b, :, s]
    return out


class ReferenceKernel:
    """Stands in for FlashAttentionScore on CPU: checks the call against the documented contract of the
    kernel (MindSpore 2.10 `ops.flash_attention_score`), then returns the NumPy reference as the 4th output."""

    def __init__(self, primitive, model_config):
        self.primitive = primitive
        self.model_config = model_config
        self.calls = []

    def check_attributes(self, longest_segment):
        tnd = FlashAttentionScore(head_num=1, input_layout="TND").input_layout
        attrs = self.primitive
        assert attrs.input_layout == tnd and attrs.sparse_mode == 3 and attrs.next_tokens == 0
        assert attrs.pre_tokens >= longest_segment and attrs.keep_prob == 1.0
        assert attrs.head_num == self.model_config.num_attention_heads
        assert attrs.scale_value == pytest.approx(softmax_scale(self.model_config), rel=1e-7)

    def __call__(self, query, key, value, real_shift, drop_mask, padding_mask, attn_mask, prefix, qlen, kvlen):
        assert real_shift is None and drop_mask is None and padding_mask is None and prefix is None
        assert query.dtype in (ms.float16, ms.bfloat16) and query.dtype == key.dtype == value.dtype
        assert query.shape == key.shape == value.shape and query.ndim == 3 and query.shape[-1] % 16 == 0
        mask = attn_mask.asnumpy()
        assert attn_mask.dtype == ms.uint8 and mask.shape == (2048, 2048)
        np.testing.assert_array_equal(mask, np.triu(np.ones((2048, 2048), np.uint8), 1))
        lengths = qlen.asnumpy()
        np.testing.assert_array_equal(lengths, kvlen.asnumpy())
        assert len(lengths) <= 1024 and lengths[-1] == query.shape[0] and (np.diff(lengths) >= 0).all()
        self.check_attributes(int(np.diff(np.concatenate(([0], lengths))).max()))
        self.calls.append(lengths)
        out = reference_tnd_attention(query.asnumpy(), key.asnumpy(), value.asnumpy(), lengths,
                                      self.primitive.scale_value)
        return None, None, None, Tensor(out.astype(np.float16)).astype(query.dtype)


def half_config(**overrides):
    return DeepseekV3Config(**dict(TINY, compute_dtype="float16", **overrides))


def reference_core(model_config=None):
    """A FlashAttentionCore whose kernel is the NumPy reference."""
    model_config = model_config or half_config()
    core = fa.FlashAttentionCore(model_config)
    core.flash_attention = ReferenceKernel(core.flash_attention, model_config)
    return core


def random_qkv(batch, seed=0, config=None):
    config = config or DeepseekV3Config(**TINY)
    rng = np.random.RandomState(seed)
    heads = config.num_attention_heads
    query, key = (rng.randn(batch, heads, SEQ, config.qk_head_dim).astype(np.float32) for _ in range(2))
    return query, key, rng.randn(batch, heads, SEQ, config.v_head_dim).astype(np.float32)


def cpu_packed_attention(query, key, value, actual_seq_len):
    """The CPU model's attention on packed rows: the recomputing core under the block-diagonal mask."""
    core = mla.RecomputingAttentionCore(DeepseekV3Config(**TINY))
    if actual_seq_len is None:
        mask = mla.causal_mask(SEQ)
    else:
        mask = mla.document_causal_mask(mla.document_ids(Tensor(actual_seq_len), SEQ))
    return core(Tensor(query), Tensor(key), Tensor(value), mask).asnumpy()


# ---------------------------------------------------------------------------------------------------------------
# pure layout functions
# ---------------------------------------------------------------------------------------------------------------

def test_tnd_conversion_round_trips():
    query, _, value = random_qkv(3)
    tnd = fa.to_tnd(Tensor(query))
    np.testing.assert_array_equal(tnd.asnumpy(), tnd_np(query))
    np.testing.assert_array_equal(fa.from_tnd(tnd, 3).asnumpy(), query)
    padded = fa.pad_head_dim(fa.to_tnd(Tensor(value)), 16, ms.ops.Concat(-1)).asnumpy()
    assert padded.shape == (3 * SEQ, 2, 16) and not padded[..., 8:].any()
    np.testing.assert_array_equal(padded[..., :8], tnd_np(value))


@pytest.mark.parametrize("segments_per_row, batch_shards", [(SEQ, 1), (4, 1), (3, 2), (SEQ, 4)])
def test_flattened_lengths_equal_brute_force(segments_per_row, batch_shards):
    rows = ROWS if segments_per_row >= 4 else ((9, 7), (11,), (12, 12), (24,))
    actual = actual_seq_len_of(rows)
    slots, rows_per_shard = min(segments_per_row, SEQ), len(rows) // batch_shards
    expected = brute_force_segments(actual, SEQ, slots, rows_per_shard)
    numpy_version = fa.flatten_actual_seq_len_np(actual, SEQ, segments_per_row, batch_shards)
    ops_version = fa.flatten_actual_seq_len(Tensor(actual), SEQ, segments_per_row, batch_shards).asnumpy()
    np.testing.assert_array_equal(numpy_version, expected)
    np.testing.assert_array_equal(ops_version, expected)
    # what the kernel needs per shard: non-decreasing, ending at that shard's T
    for shard in np.split(ops_version, batch_shards):
        assert (np.diff(shard) >= 0).all() and shard[-1] == rows_per_shard * SEQ
    if batch_shards > 1:      # each shard is the flattening of its rows alone
        alone = fa.flatten_actual_seq_len_np(actual[:rows_per_shard], SEQ, segments_per_row)
        np.testing.assert_array_equal(ops_version[:len(alone)], alone)
        np.testing.assert_array_equal(ops_version[len(alone):2 * len(alone)],
                                      fa.flatten_actual_seq_len_np(actual[rows_per_shard:2 * rows_per_shard],
                                                                   SEQ, segments_per_row))


def test_full_rows_and_argument_errors():
    np.testing.assert_array_equal(fa.full_row_seq_len(4, SEQ).asnumpy(), [24, 48, 72, 96])
    np.testing.assert_array_equal(fa.full_row_seq_len(4, SEQ, 2).asnumpy(), [24, 48, 24, 48])
    actual = actual_seq_len_of(ROWS)
    with pytest.raises(ValueError, match=r"batch_shards \(3\) must be a positive divisor of the batch size"):
        fa.flatten_actual_seq_len_np(actual, SEQ, 4, batch_shards=3)
    big = np.repeat(actual, 64, axis=0)                 # 256 rows x 24 entries > 1024 per kernel call
    with pytest.raises(ValueError, match="more than the 1024 actual_seq_qlen entries"):
        fa.flatten_actual_seq_len(Tensor(big), SEQ, 128)
    with pytest.raises(ConfigError, match=r"batch_shards \(0\) must be a positive integer"):
        fa.set_batch_shards(ms.nn.Cell(), 0)
    with pytest.raises(ConfigError, match=r"segments_per_row \(2.0\) must be a positive integer"):
        fa.FlashAttentionCore(half_config(), segments_per_row=2.0)


def test_segment_capacity_is_checked_and_matters():
    """A row with more segments than slots merges its last documents: the check names it beforehand, and the
    merged layout really attends across documents (so the check guards something observable)."""
    crowded = actual_seq_len_of([(3, 4, 5, 2, 6)])          # 5 documents + padding = 6 segments
    np.testing.assert_array_equal(fa.row_segment_counts(crowded, SEQ), [6])
    fa.check_segment_capacity(crowded, SEQ, segments_per_row=6)
    with pytest.raises(ConfigError, match=r"segments of actual_seq_len\[0\] \(6\) must be at most 4"):
        fa.check_segment_capacity(crowded, SEQ, segments_per_row=4)
    fa.check_segment_capacity(actual_seq_len_of(ROWS), SEQ, segments_per_row=4)
    query, key, value = random_qkv(1, seed=3)
    expected = cpu_packed_attention(query, key, value, crowded)
    scale = softmax_scale(DeepseekV3Config(**TINY))
    for slots, agrees in ((6, True), (4, False)):
        layout = fa.flatten_actual_seq_len_np(crowded, SEQ, slots)
        got = reference_tnd_attention(tnd_np(query), tnd_np(key), tnd_np(value), layout, scale)
        assert np.allclose(got, tnd_np(expected), atol=1e-5) == agrees, slots


# ---------------------------------------------------------------------------------------------------------------
# the layout means what the explicit mask means
# ---------------------------------------------------------------------------------------------------------------

def test_reference_tnd_attention_equals_the_cpu_packed_attention():
    query, key, value = random_qkv(len(ROWS), seed=1)
    actual = actual_seq_len_of(ROWS)
    scale = softmax_scale(DeepseekV3Config(**TINY))
    expected = cpu_packed_attention(query, key, value, actual)
    for slots in (SEQ, 4):
        layout = fa.flatten_actual_seq_len(Tensor(actual), SEQ, slots).asnumpy()
        got = reference_tnd_attention(tnd_np(query), tnd_np(key), tnd_np(value), layout, scale)
        np.testing.assert_allclose(got, tnd_np(expected), rtol=0, atol=1e-5)
    # one sequence per row: the full-row list against the plain causal mask
    full = reference_tnd_attention(tnd_np(query), tnd_np(key), tnd_np(value),
                                   fa.full_row_seq_len(len(ROWS), SEQ).asnumpy(), scale)
    np.testing.assert_allclose(full, tnd_np(cpu_packed_attention(query, key, value, None)), rtol=0, atol=1e-5)
    assert np.abs(full - tnd_np(expected)).max() > 1e-2        # and packing does change the result


def test_flash_core_end_to_end_with_the_reference_kernel():
    """The whole cell (casts, TND, v padding, the kernel call, cut and back) with the kernel replaced."""
    core = reference_core()
    query, key, value = random_qkv(len(ROWS), seed=2)
    actual = actual_seq_len_of(ROWS)
    layout = core.attention_layout(SEQ, Tensor(actual))
    out = core(Tensor(query), Tensor(key), Tensor(value), layout)
    assert out.shape == (len(ROWS), 2, SEQ, 8) and out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), cpu_packed_attention(query, key, value, actual), rtol=0,
                               atol=HALF_TOLERANCE)
    unpacked = core(Tensor(query), Tensor(key), Tensor(value), core.attention_layout(SEQ))
    np.testing.assert_allclose(unpacked.asnumpy(), cpu_packed_attention(query, key, value, None), rtol=0,
                               atol=HALF_TOLERANCE)
    np.testing.assert_array_equal(core.flash_attention.calls[0], fa.flatten_actual_seq_len_np(actual, SEQ))
    np.testing.assert_array_equal(core.flash_attention.calls[1], [24, 48, 72, 96])


# ---------------------------------------------------------------------------------------------------------------
# the whole model with flash-attention cores (kernel replaced), the switch, the shard strategies
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def flash_cores(monkeypatch):
    """Call it to make the models built afterwards use flash-attention cores with the reference kernel (the
    kernel computes in float16; the rest of the model stays in float32)."""
    def switch_on():
        monkeypatch.setattr(mla, "attention_core", lambda model_config, device_target=None: reference_core(
            model_config.replace(compute_dtype="float16")))
    return switch_on


def packed_batch(rows, seed=0):
    rng = np.random.RandomState(seed)
    actual = actual_seq_len_of(rows)
    ids = rng.randint(1, TINY["vocab_size"], (len(rows), SEQ)).astype(np.int32)
    positions = np.zeros_like(ids)
    for row, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            positions[row, start:start + length] = np.arange(length)
            start += length
    labels = np.roll(ids, -1, 1)
    loss_mask = (positions[:, 1:] > 0).astype(np.float32)            # next token in the same document
    loss_mask = np.concatenate((loss_mask, np.zeros((len(rows), 1), np.float32)), 1)
    return tuple(Tensor(item) for item in (ids, labels, loss_mask, positions, actual))


def test_model_with_flash_cores_equals_the_cpu_model(flash_cores):
    ms.set_seed(7)
    reference = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY))
    flash_cores()
    flash = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY))
    ms.load_param_into_net(flash, reference.parameters_dict())
    assert flash.model.flash_attention and not reference.model.flash_attention
    ids, labels, loss_mask, positions, actual = packed_batch(ROWS)
    _, _, layout, documents = flash.model.positional(SEQ, positions, actual)
    np.testing.assert_array_equal(layout.asnumpy(), fa.flatten_actual_seq_len_np(actual.asnumpy(), SEQ))
    assert documents.shape == (len(ROWS), SEQ)
    logits = flash(ids, position_ids=positions, actual_seq_len=actual).asnumpy()
    expected = reference(ids, position_ids=positions, actual_seq_len=actual).asnumpy()
    difference = np.abs(logits - expected).max()
    assert difference < 1e-2
    assert np.abs(flash(ids).asnumpy() - expected).max() > 10 * difference      # unpacked really differs
    losses = [float(item.asnumpy()) for item in flash(ids, labels, loss_mask, positions, actual)[:3]]
    expected_losses = [float(item.asnumpy()) for item in reference(ids, labels, loss_mask, positions, actual)[:3]]
    np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=2e-3)


def test_use_flash_attention_selects_the_core_on_ascend_only():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    mla.logger.addHandler(handler)
    mla._note_flash_attention_ignored.cache_clear()
    try:
        flagged = half_config()
        flagged.use_flash_attention = True          # DeepseekV3Config has no such field yet: set on the instance
        assert isinstance(mla.attention_core(flagged, "Ascend"), fa.FlashAttentionCore)
        assert type(mla.attention_core(half_config(), "Ascend")) is mla.AttentionCore
        assert type(mla.attention_core(flagged, "CPU")) is mla.RecomputingAttentionCore
        assert type(mla.attention_core(flagged, "CPU")) is mla.RecomputingAttentionCore
    finally:
        mla.logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == [
        "use_flash_attention: ignored on CPU (FlashAttentionScore is an Ascend kernel); attention runs through "
        "the explicit-mask core, which computes the same result"]
    full_precision = DeepseekV3Config(**TINY)
    full_precision.use_flash_attention = True
    with pytest.raises(ConfigError, match=r"model_config.compute_dtype \('float32'\) must be one of"):
        mla.attention_core(full_precision, "Ascend")
    with pytest.raises(ConfigError, match="must be a multiple of 16"):
        fa.FlashAttentionCore(half_config(qk_nope_head_dim=4))


PARALLEL = dict(data_parallel=4, model_parallel=2, expert_parallel=2)


def test_flash_cores_declare_their_primitives_and_plan_mindformers_strategies(flash_cores):
    flash_cores()
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**dict(TINY, vocab_size=512)))
    cores = [path for path, cell in model.cells_and_names() if isinstance(cell, fa.FlashAttentionCore)]
    assert cores == [f"model.layers.{index}.self_attn.core" for index in range(3)]       # main blocks and MTP
    for path in cores:
        core = dict(model.cells_and_names())[path]
        core.flash_attention = core.flash_attention.primitive             # plan the real primitive
        assert {name for name, value in vars(core).items() if isinstance(value, Primitive)} == set(core.shard_ops)
    planned, unmatched = plan_shard_calls(model, ParallelConfig.from_dict(PARALLEL), SHARD_TABLE)
    in_cores = {(path, attribute): (kind, strategy) for path, attribute, kind, strategy in planned if path in cores}
    for path in cores:    # written out from MindFormers' TND strategy: T over dp, heads over mp, mask whole
        assert in_cores[(path, "flash_attention")] == (
            "attention.flash_attention", ((4, 2, 1), (4, 2, 1), (4, 2, 1), (1, 1), (4,), (4,)))
        assert in_cores[(path, "value_pad")] == ("attention.value_pad", ((4, 2, 1), (4, 2, 1)))
    # the explicit-mask kinds are now declared by nobody; the flash kinds by every core
    assert {"attention.qk_bmm", "attention.mask_add", "attention.softmax"} <= set(unmatched)
    assert "attention.flash_attention" not in unmatched
    report = apply_shard_strategies(model, ParallelConfig.from_dict(PARALLEL), SHARD_TABLE, force=True)
    core = dict(model.cells_and_names())[cores[0]]
    assert report.applied and core.flash_attention.attrs["in_strategy"][0] == (4, 2, 1)
    assert fa.set_batch_shards(model, 4) == 3 and core.batch_shards == 4
    layout = core.attention_layout(SEQ, Tensor(actual_seq_len_of(ROWS)))
    np.testing.assert_array_equal(layout.asnumpy(), fa.flatten_actual_seq_len_np(actual_seq_len_of(ROWS), SEQ,
                                                                                 batch_shards=4))


class _Positional(ms.nn.Cell):
    """The model's per-forward layout construction alone (no kernel), to compile it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, position_ids, actual_seq_len):
        return self.model.positional(SEQ, position_ids, actual_seq_len)[2]


def test_the_layout_compiles_in_graph_mode(flash_cores):
    """GRAPH mode is what runs on Ascend: the layout built there equals the PyNative one (the kernel call
    itself cannot be compiled on CPU)."""
    flash_cores()
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY))
    _, _, _, positions, actual = packed_batch(ROWS)
    fa.set_batch_shards(model, 2)
    layout = _Positional(model.model)
    eager = layout(positions, actual).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        compiled = layout(positions, actual).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_array_equal(compiled, eager)
    np.testing.assert_array_equal(eager, fa.flatten_actual_seq_len_np(actual.asnumpy(), SEQ, batch_shards=2))


def test_the_parallel_plan_tells_every_flash_core_its_data_parallel_shards():
    """`ModelSpec.prepare_parallel`, called by the parallel plan before sharding, sets batch_shards = dp."""
    from types import SimpleNamespace

    from research.deepseek3.spec import DEEPSEEK_V3_SPEC

    class TwoCores(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.first, self.second = reference_core(), reference_core()

    cells = TwoCores()
    DEEPSEEK_V3_SPEC.prepare_parallel(cells, SimpleNamespace(data_parallel=4))
    assert cells.first.batch_shards == cells.second.batch_shards == 4
