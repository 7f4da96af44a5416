"""MLA attention through MindSpore's FlashAttentionScore in the TND layout (Ascend), packed rows included.

Why: on Ascend the explicit [B, 1, S, S] mask of `mla.document_causal_mask` costs S x S memory per row and the
autodiff core keeps score-sized tensors for backward. Flash attention keeps neither; packed rows become
"varlen" attention: q/k/v flattened to T = B*S tokens, and `actual_seq_qlen`/`actual_seq_kvlen` (the
cumulative segment ends over the flattened batch) cut T into segments, each attended causally on its own.

What MindFormers does, and this module follows (mindformers/parallel_core/training_graph/transformer/
flash_attention.py, multi_latent_attention.py, transformer_config.py, mask_generate.py; dataset/
blended_datasets/gpt_dataset.py `_get_eod_attention_mask`, dataset/causal_language_model_dataset.py
`asl_batch_wrapper`):
  * use_flash_attention with packed data (`use_eod_attn_mask_compression`): input_layout "TND", sparse_mode 3
    (rightDownCausal), the compressed mask triu(ones(2048, 2048), 1) in uint8 (1 = masked), pre_tokens 2^31-1,
    next_tokens 0, keep_prob 1 (attention dropout is forced to 0 in TND);
  * MLA's q/k head dim (192) differs from v's (128): v is zero-padded to 192 before the kernel and the output
    cut back to 128 (MindSpore 2.10 wants one D for query, key and value);
  * the per-row cumulative ends are offset by the rows before them (within one micro batch), so the list
    ends at T; `actual_seq_qlen` and `actual_seq_kvlen` are the same list (self-attention);
  * shard strategy without context parallel: q/k/v (dp, mp, 1), mask (1, 1), both lists (dp,).
Constraints of `ops.flash_attention_score` (MindSpore 2.10 docstring; the functional form builds this same
primitive): float16/bfloat16 only; head dim a multiple of 16, at most 512; in TND the lists are
non-decreasing, end at T and hold at most 1024 entries; sparse_mode 2/3 need the 2048 x 2048 mask;
sparse_mode 3 needs S_q <= S_kv per segment (equal here). CANN's aclnnFlashAttentionVarLenScore documents
zero-length segments (repeated entries, e.g. [2, 4, 4, 6, 8]) as allowed; the MindSpore docstring says "0
should not exist in list_seq_k". MindFormers' own lists repeat S after the last end, and so do ours.

Our rows (docs/sft.md) carry `actual_seq_len` [B, L]: each row's cumulative document ends padded by repeating
the last end. Per row the first K = min(segments_per_row, L) entries are kept, repeated entries become S (so the
padding after the last document is one segment of its own, as the CPU mask makes it one block), and the last
slot is forced to S (every row ends at S). A row needing more than K segments would merge its later documents:
`check_segment_capacity` finds such rows before they reach the model. Row b is offset by (b mod B/shards) * S:
under data parallelism (`batch_shards` = dp, see `set_batch_shards`) each rank's kernel sees its own rows and
its local T, which MindSpore does not rewrite when it splits the batch (it only rewrites the lists for a
sequence split).

Nothing here has run on Ascend: the kernel has no CPU implementation. The input preparation is plain
functions (NumPy and MindSpore-op versions) tested on CPU, and the tests replace the kernel by a NumPy
reference to run the whole cell (tests/model/test_flash_attention_layout.py).
"""
import functools

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops.operations.nn_ops import FlashAttentionScore

from mindpretrain.validation import require
from research.deepseek3.layers import ms_dtype
from research.deepseek3.rope import softmax_scale

MAX_SEGMENTS_PER_ROW = 128          # MindFormers' eod_pad_length default: entries of actual_seq_len per row
MAX_SEGMENTS_PER_CALL = 1024        # MindSpore 2.10: at most 1024 entries in actual_seq_qlen (TND)
COMPRESSED_MASK_SIZE = 2048         # the kernel's compressed causal mask for sparse_mode 2/3/4
CAUSAL_SPARSE_MODE = 3              # rightDownCausal: causal within each segment (S_q = S_kv)
KERNEL_DTYPES = ("float16", "bfloat16")
NO_LIMIT = 2147483647


# ---------------------------------------------------------------------------------------------------------------
# the layout, NumPy (data side, tests)
# ---------------------------------------------------------------------------------------------------------------

def _slots_and_rows(batch, length, seq_length, segments_per_row, batch_shards):
    """(entries kept per row, rows per data-parallel shard), checked against the kernel's list limit.

    Runs inside compiled graphs too, where MindSpore raises only built-in exception types: hence ValueError
    (ConfigError's base) with the key (value) rule message of `require`; the types of the two settings are
    checked where they are set (`FlashAttentionCore`, `set_batch_shards`)."""
    if segments_per_row < 1:
        raise ValueError(f"segments_per_row ({segments_per_row}) must be a positive integer")
    if batch_shards < 1 or batch % batch_shards != 0:
        raise ValueError(f"batch_shards ({batch_shards}) must be a positive divisor of the batch size ({batch})")
    if length < 1:
        raise ValueError(f"actual_seq_len shape (({batch}, {length})) needs at least one entry per row")
    slots, rows = min(segments_per_row, length), batch // batch_shards
    if rows * slots > MAX_SEGMENTS_PER_CALL:
        raise ValueError(f"segments_per_row ({segments_per_row}) gives {rows} rows x {slots} entries per kernel "
                         f"call, more than the {MAX_SEGMENTS_PER_CALL} actual_seq_qlen entries FlashAttentionScore "
                         f"takes (seq_length {seq_length})")
    return slots, rows


def _check_settings(segments_per_row, batch_shards):
    """The two layout settings, where they are set (outside any graph)."""
    for key, value in (("segments_per_row", segments_per_row), ("batch_shards", batch_shards)):
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, value,
                "must be a positive integer")


def flatten_actual_seq_len_np(actual_seq_len, seq_length, segments_per_row=MAX_SEGMENTS_PER_ROW, batch_shards=1):
    """int32 [B * K]: the TND `actual_seq_qlen` of rows whose `actual_seq_len` [B, L] holds cumulative document
    ends padded by repeating the last one (module docstring: K slots per row, padding its own segment, every
    row ending at S, row offsets restarting every B / batch_shards rows)."""
    ends = np.asarray(actual_seq_len, dtype=np.int64)
    batch, length = ends.shape
    slots, rows = _slots_and_rows(batch, length, seq_length, segments_per_row, batch_shards)
    ends = ends[:, :slots].copy()
    repeated = np.zeros_like(ends, dtype=bool)
    repeated[:, 1:] = ends[:, 1:] == ends[:, :-1]
    ends[repeated] = seq_length
    ends[:, -1] = seq_length
    offsets = (np.arange(batch) % rows) * seq_length
    return (ends + offsets[:, None]).reshape(-1).astype(np.int32)


def row_segment_counts(actual_seq_len, seq_length):
    """int [B]: segments each row needs, its documents plus one for the padding after the last end (if any)."""
    ends = np.asarray(actual_seq_len, dtype=np.int64)
    documents = np.array([len(np.unique(row)) for row in ends])
    return documents + (ends[:, -1] < seq_length)


def check_segment_capacity(actual_seq_len, seq_length, segments_per_row=MAX_SEGMENTS_PER_ROW):
    """ConfigError naming the first row that needs more than min(segments_per_row, L) segments: its later
    documents would attend to each other in the flash-attention layout, and a compiled step cannot look
    at the data to say so."""
    counts = row_segment_counts(actual_seq_len, seq_length)
    slots = min(segments_per_row, np.asarray(actual_seq_len).shape[1])
    over = np.flatnonzero(counts > slots)
    row = int(over[0]) if len(over) else 0
    require(len(over) == 0, f"segments of actual_seq_len[{row}]", int(counts[row]),
            f"must be at most {slots} (documents + padding) for flash attention's TND layout; pack fewer "
            "documents per row or raise segments_per_row")


@functools.lru_cache(maxsize=1)
def compressed_causal_mask_np():
    """uint8 [2048, 2048], 1 above the diagonal: the mask sparse_mode 3 reads (1 = not attended)."""
    mask = np.triu(np.ones((COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE), np.uint8), k=1)
    mask.flags.writeable = False          # cached and shared
    return mask


@functools.lru_cache(maxsize=1)
def _compressed_causal_mask():
    """The mask as one Tensor shared by every layer's core (4 MiB once, not per layer)."""
    return Tensor(compressed_causal_mask_np())


# ---------------------------------------------------------------------------------------------------------------
# the layout, MindSpore ops (the model; also run on CPU)
# ---------------------------------------------------------------------------------------------------------------

def flatten_actual_seq_len(actual_seq_len, seq_length, segments_per_row=MAX_SEGMENTS_PER_ROW, batch_shards=1):
    """`flatten_actual_seq_len_np` in MindSpore ops: int [B, L] Tensor -> int32 [B * K] Tensor, no gradient."""
    batch, length = actual_seq_len.shape
    slots, rows = _slots_and_rows(batch, length, seq_length, segments_per_row, batch_shards)
    ends = ops.cast(actual_seq_len[:, :slots], ms.int32)
    row_end = ops.full((batch, 1), seq_length, dtype=ms.int32)
    if slots > 1:
        repeated = ends[:, 1:] == ends[:, :-1]
        later = ops.select(repeated, ops.full(repeated.shape, seq_length, dtype=ms.int32), ends[:, 1:])
        ends = ops.concat((ops.concat((ends[:, :1], later), 1)[:, :-1], row_end), 1)
    else:
        ends = row_end
    offsets = (ops.arange(0, batch, dtype=ms.int32) % rows * seq_length).reshape(batch, 1)
    return ops.stop_gradient((ends + offsets).reshape(-1))


def full_row_seq_len(batch, seq_length, batch_shards=1):
    """int32 [B]: one causal segment per row (unpacked rows in the TND layout)."""
    _, rows = _slots_and_rows(batch, 1, seq_length, 1, batch_shards)
    return (ops.arange(0, batch, dtype=ms.int32) % rows + 1) * seq_length


def to_tnd(x):
    """[B, N, S, D] -> [B*S, N, D]: token t = b*S + s, the order the cumulative lists count in."""
    batch, heads, seq, dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch * seq, heads, dim)


def from_tnd(x, batch):
    """[B*S, N, D] -> [B, N, S, D], the inverse of `to_tnd`."""
    tokens, heads, dim = x.shape
    return x.reshape(batch, tokens // batch, heads, dim).transpose(0, 2, 1, 3)


def pad_head_dim(x, width, concat):
    """[T, N, D] -> [T, N, width], zeros appended (v to q's head dim; the zeros add nothing to P v)."""
    missing = width - x.shape[-1]
    if missing == 0:
        return x
    return concat((x, ops.zeros(x.shape[:-1] + (missing,), x.dtype)))


# ---------------------------------------------------------------------------------------------------------------
# the cell
# ---------------------------------------------------------------------------------------------------------------

class FlashAttentionCore(nn.Cell):
    """softmax(q k^T * scale) v, causal within each segment, through FlashAttentionScore (TND, sparse_mode 3).

    The call of `mla.AttentionCore`: construct(query [B,N,S,Dqk], key [B,N,S,Dqk], value [B,N,S,Dv], layout)
    -> [B,N,S,Dv]. `layout` is what `attention_layout` built once per forward: the flattened cumulative
    segment ends (int32 [B*K]) for packed rows, None for one causal sequence per row. Parameter-free."""

    def __init__(self, model_config, segments_per_row=MAX_SEGMENTS_PER_ROW, batch_shards=1):
        super().__init__()
        require(model_config.compute_dtype in KERNEL_DTYPES, "model_config.compute_dtype",
                model_config.compute_dtype, f"must be one of {KERNEL_DTYPES} with use_flash_attention: "
                "MindSpore's FlashAttentionScore takes half precision only")
        qk_dim, v_dim = model_config.qk_head_dim, model_config.v_head_dim
        require(qk_dim % 16 == 0 and qk_dim <= 512, "qk_nope_head_dim + qk_rope_head_dim", qk_dim,
                "must be a multiple of 16 and at most 512 for FlashAttentionScore")
        require(v_dim <= qk_dim, "v_head_dim", v_dim, f"must not exceed the q/k head dim ({qk_dim}): v is "
                "zero-padded to it for the kernel")
        self.qk_dim, self.v_dim = qk_dim, v_dim
        self.compute_dtype = ms_dtype(model_config.compute_dtype)
        _check_settings(segments_per_row, batch_shards)
        self.segments_per_row, self.batch_shards = segments_per_row, batch_shards
        self.causal_mask = _compressed_causal_mask()
        self.flash_attention = FlashAttentionScore(
            head_num=model_config.num_attention_heads, keep_prob=1.0, scale_value=float(softmax_scale(model_config)),
            pre_tokens=NO_LIMIT, next_tokens=0, inner_precise=0, input_layout="TND", sparse_mode=CAUSAL_SPARSE_MODE)
        self.value_pad = ops.Concat(-1)
        self.shard_ops = {"flash_attention": "attention.flash_attention", "value_pad": "attention.value_pad"}

    def attention_layout(self, seq_length, actual_seq_len=None):
        """What every block's core reads, built once per forward: None (one causal sequence per row) or the
        flattened cumulative segment ends of packed rows."""
        if actual_seq_len is None:
            return None
        return flatten_actual_seq_len(actual_seq_len, seq_length, self.segments_per_row, self.batch_shards)

    def construct(self, query, key, value, layout):
        batch, seq = query.shape[0], query.shape[2]
        if layout is None:
            layout = full_row_seq_len(batch, seq, self.batch_shards)
        query_t = to_tnd(ops.cast(query, self.compute_dtype))
        key_t = to_tnd(ops.cast(key, self.compute_dtype))
        value_t = pad_head_dim(to_tnd(ops.cast(value, self.compute_dtype)), self.qk_dim, self.value_pad)
        out = self.flash_attention(query_t, key_t, value_t, None, None, None, self.causal_mask, None, layout,
                                   layout)[3]
        return ops.cast(from_tnd(out[..., :self.v_dim], batch), query.dtype)


def set_batch_shards(model, batch_shards):
    """Tell every flash-attention core of `model` how many data-parallel shards split the batch (the row
    offsets restart per shard: module docstring). Call it before the first compiled step; returns the count."""
    _check_settings(MAX_SEGMENTS_PER_ROW, batch_shards)
    cores = [cell for _, cell in model.cells_and_names() if isinstance(cell, FlashAttentionCore)]
    for core in cores:
        core.batch_shards = batch_shards
    return len(cores)
