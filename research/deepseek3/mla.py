"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with decoupled RoPE and an additive mask: causal
(`causal_mask`, [1, 1, S, S]) or, for rows packed with several documents, causal within each document
(`document_causal_mask`, [B, 1, S, S]; on Ascend with `use_flash_attention`, flash attention's TND layout
does this instead: research/deepseek3/flash_attention.py).

Per token x [H]:
  q      = q_b_proj(RMSNorm(q_a_proj(x)))        (or q_proj(x) when q_lora_rank is null) -> N heads of
           [qk_nope_head_dim | qk_rope_head_dim]
  c, kr  = split(kv_a_proj_with_mqa(x))          c: the kv_lora_rank latent, kr: ONE rope key shared by all heads
  k, v   = split(kv_b_proj(RMSNorm(c)))          per head [qk_nope_head_dim], [v_head_dim]
  score  = [q_nope | rope(q_rope)] . [k_nope | rope(kr)] * softmax_scale   (causal, softmax in fp32)
  out    = o_proj(concat_heads(softmax(score) v))
Parameter names are the HF ones (`self_attn.q_a_proj.weight`, ...). The score/softmax/context part is its own
parameter-free cell (`core`, see `attention_core`) so selective recompute can recompute exactly the S x S part:
on Ascend the autodiff `AttentionCore` (or, with `use_flash_attention`, `flash_attention.FlashAttentionCore`,
which reads the packed layout instead of a mask), elsewhere `RecomputingAttentionCore`, whose hand-written
backward is cheaper on CPU.
Projections, the q/k concatenations, the score/context batch matmuls, the scale, the mask add and the softmax
are primitives declared in `shard_ops` (see layers.py); RoPE and the shared-key broadcast are left to sharding
propagation.
"""
import functools

import mindspore as ms
from mindspore import nn, ops

from mindpretrain.utils.logging import get_logger
from research.deepseek3.flash_attention import FlashAttentionCore
from research.deepseek3.layers import Linear, RMSNorm, broadcasts_explicitly, expand_to, ms_dtype, split_last
from research.deepseek3.rope import apply_rotary, softmax_scale

logger = get_logger("deepseek3.attention")

MASK_VALUE = -1.0e9


def causal_mask(seq_length):
    """Additive [1, 1, S, S] float32 mask: 0 on and below the diagonal, -1e9 above (future positions).

    Rank 4 like the scores it is added to, so the add's shard strategy has one entry per dimension."""
    rows = ops.arange(0, seq_length, dtype=ms.int32).reshape(seq_length, 1)
    cols = ops.arange(0, seq_length, dtype=ms.int32).reshape(1, seq_length)
    return ops.select(cols > rows, ops.full((seq_length, seq_length), MASK_VALUE, dtype=ms.float32),
                      ops.zeros((seq_length, seq_length), ms.float32)).reshape(1, 1, seq_length, seq_length)


def document_ids(actual_seq_len, seq_length):
    """int32 [B, S]: the document of each position of packed rows, = the number of `actual_seq_len` entries <= p.

    actual_seq_len int [B, L] holds each row's cumulative document ends, padded by repeating the last end, so the
    padding after the last document gets an id of its own (one extra block). A sorted search, O(S log L) per row,
    instead of comparing every position with every end."""
    ends = ops.cast(actual_seq_len, ms.int32)
    positions = ops.broadcast_to(ops.arange(0, seq_length, dtype=ms.int32).reshape(1, seq_length),
                                 (ends.shape[0], seq_length))
    return ops.stop_gradient(ops.searchsorted(ends, positions, right=True, out_int32=True))


def document_causal_mask(documents):
    """Additive [B, 1, S, S] float32 mask of packed rows: 0 where column j <= row i and both positions are in the
    same document (`document_ids`), -1e9 elsewhere. Every row keeps its diagonal, so no softmax row is empty."""
    seq_length = documents.shape[1]
    rows = ops.arange(0, seq_length, dtype=ms.int32).reshape(1, seq_length, 1)
    cols = ops.arange(0, seq_length, dtype=ms.int32).reshape(1, 1, seq_length)
    same_document = ops.expand_dims(documents, 2) == ops.expand_dims(documents, 1)          # [B, S, S]
    allowed = ops.logical_and(same_document, cols <= rows)
    mask = ops.select(allowed, ops.zeros(allowed.shape, ms.float32),
                      ops.full(allowed.shape, MASK_VALUE, dtype=ms.float32))
    return ops.stop_gradient(ops.expand_dims(mask, 1))


class AttentionCore(nn.Cell):
    """softmax(q k^T * scale + mask) v, the softmax in `softmax_compute_type`. Autodiff backward (used where the
    parallel plan shards these primitives, i.e. Ascend; see `RecomputingAttentionCore` for the other devices)."""

    def __init__(self, model_config):
        super().__init__()
        self.scale = float(softmax_scale(model_config))
        self.softmax_dtype = ms_dtype(model_config.softmax_compute_type)
        self.compute_dtype = ms_dtype(model_config.compute_dtype)
        self.scale_mul = ops.Mul()
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)
        self.mask_add = ops.Add()
        self.softmax = ops.Softmax(-1)
        self.context_matmul = ops.BatchMatMul()
        self.explicit_broadcast = broadcasts_explicitly()
        self.shard_ops = {"scale_mul": "attention.scale_mul", "scores_matmul": "attention.qk_bmm",
                          "mask_add": "attention.mask_add", "softmax": "attention.softmax",
                          "context_matmul": "attention.pv_bmm"}

    def probabilities(self, query, key, mask):
        """softmax(q k^T * scale + mask) in the compute dtype, [B, N, S, S]."""
        # The scale goes on the query ([B,N,S,D]) rather than the scores ([B,N,S,S]), and casts only happen when
        # the dtypes differ: every S x S temporary avoided is memory the graph keeps for backward.
        scores = self.scores_matmul(self.scale_mul(query, self.scale), key)
        if self.softmax_dtype != self.compute_dtype:
            scores = ops.cast(scores, self.softmax_dtype)
        probs = self.softmax(self.mask_add(scores, expand_to(mask, scores.shape, self.explicit_broadcast)))
        if self.softmax_dtype != self.compute_dtype:
            probs = ops.cast(probs, self.compute_dtype)
        return probs

    def construct(self, query, key, value, mask):
        return self.context_matmul(self.probabilities(query, key, mask), value)


# Primitives of the hand-written backward below: module-level, not cell attributes, because they are not part of
# any parallel plan (that backward only runs where no plan is applied; every attribute primitive is in shard_ops).
_BMM_TN = ops.BatchMatMul(transpose_a=True)
_BMM_NT = ops.BatchMatMul(transpose_b=True)
_BMM_NN = ops.BatchMatMul()


class RecomputingAttentionCore(AttentionCore):
    """The same forward, with a hand-written backward that takes P from q, k again (FlashAttention style).

    Why: on the CPU backend, autodiff of Softmax expands into Mul/ReduceSum/Sub over [B, N, S, S], and that
    last-axis ReduceSum dominates the attention backward. Here the backward uses the identity
    sum_j P_ij dP_ij = sum_j P_ij (dO_i . v_j) = dO_i . O_i, a reduction over [B, N, S, V] instead of [B, N, S, S]:
        dV = P^T dO;  dP = dO V^T;  D = rowsum(dO * O);  W = P * dP;
        dq = scale * (W k - D * (P k));  dk = W^T (scale q) - P^T (D * scale q)     [dS = W - P * D, not formed]
    In GRAPH mode the graph compiler merges the backward's `probabilities(...)` with the identical forward
    computation, so P is computed once; in PyNative it is recomputed. Same gradients as autodiff up to float32
    summation order, for any additive mask that leaves every row an unmasked entry (the causal and the
    per-document causal masks both keep the diagonal). The mask gets no gradient (it is a constant). Not forming dS matters because the CPU
    backend's memory pool reuses [B, N, S, S] blocks poorly: each one avoided counts per layer. Profiles and
    timings: research/deepseek3/README.md.
    """

    def bprop(self, query, key, value, mask, out, dout):
        probs = self.probabilities(query, key, mask)
        grad_value = _BMM_TN(probs, dout)
        row_dot = (dout * out).sum(-1, keepdims=True)                       # [B, N, S, 1] = sum_j P_ij dP_ij
        row_dot = expand_to(row_dot, query.shape, self.explicit_broadcast)  # [B, N, S, D] (q and k: same D)
        # dS = P*dP - P*rowdot is never formed: its two products are taken apart, the rowdot term through the
        # small [B, N, S, D] side (P k, P^T (rowdot q)), so the backward makes two S x S tensors instead of three.
        weighted = probs * _BMM_NT(dout, value)                            # P * dP
        scaled_query = query * self.scale
        grad_query = (_BMM_NN(weighted, key) - row_dot * _BMM_NN(probs, key)) * self.scale
        grad_key = _BMM_TN(weighted, scaled_query) - _BMM_TN(probs, row_dot * scaled_query)
        return grad_query, grad_key, grad_value, ops.zeros_like(mask)


def attention_core(model_config, device_target=None):
    """The recomputing core everywhere except Ascend, whose parallel plan shards the autodiff core's primitives;
    on Ascend with `use_flash_attention` (MindFormers' key) the flash-attention core (TND layout).

    Elsewhere `use_flash_attention` is ignored with one notice, not refused: MindFormers' published YAMLs set
    it, and they must load and run on CPU unchanged (planning, tests, the demo); FlashAttentionScore has no CPU
    kernel, and the explicit-mask core computes the same attention."""
    device = str(device_target or ms.get_context("device_target")).upper()
    if getattr(model_config, "use_flash_attention", False):
        if device == "ASCEND":
            return FlashAttentionCore(model_config)
        _note_flash_attention_ignored(device)
    return AttentionCore(model_config) if device == "ASCEND" else RecomputingAttentionCore(model_config)


@functools.lru_cache(maxsize=None)
def _note_flash_attention_ignored(device):
    """Once per device and process (every layer asks)."""
    logger.info("use_flash_attention: ignored on %s (FlashAttentionScore is an Ascend kernel); attention runs "
                "through the explicit-mask core, which computes the same result", device)


class MultiHeadLatentAttention(nn.Cell):
    def __init__(self, model_config):
        super().__init__()
        self.num_heads = model_config.num_attention_heads
        self.nope_dim = model_config.qk_nope_head_dim
        self.rope_dim = model_config.qk_rope_head_dim
        self.v_dim = model_config.v_head_dim
        self.kv_lora_rank = model_config.kv_lora_rank
        self.interleave = bool(model_config.rope_interleave)
        self.use_q_lora = model_config.q_lora_rank is not None
        hidden, q_rank = model_config.hidden_size, model_config.q_lora_rank
        q_out = self.num_heads * model_config.qk_head_dim
        kv_out = self.num_heads * (self.nope_dim + self.v_dim)
        # Created in this order (q, kv, o): the random initialisation follows it.
        if self.use_q_lora:
            self.q_a_proj = Linear(hidden, q_rank, model_config, "attention.q_a_proj")
            self.q_a_layernorm = RMSNorm(q_rank, model_config, "attention.latent_norm")
            self.q_b_proj = Linear(q_rank, q_out, model_config, "attention.q_b_proj")
        else:
            self.q_proj = Linear(hidden, q_out, model_config, "attention.q_proj")
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope_dim, model_config,
                                         "attention.kv_a_proj")
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, model_config, "attention.latent_norm")
        self.kv_b_proj = Linear(self.kv_lora_rank, kv_out, model_config, "attention.kv_b_proj")
        self.o_proj = Linear(self.num_heads * self.v_dim, hidden, model_config, "attention.o_proj")
        self.q_concat = ops.Concat(-1)
        self.k_concat = ops.Concat(-1)
        self.shard_ops = {"q_concat": "attention.qk_concat", "k_concat": "attention.qk_concat"}
        self.core = attention_core(model_config)
        self.explicit_broadcast = broadcasts_explicitly()     # compiled CPU graphs: also Split for the splits

    def construct(self, x, cos, sin, mask):
        batch, seq, _ = x.shape
        if self.use_q_lora:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            query = self.q_proj(x)
        query = query.reshape(batch, seq, self.num_heads, self.nope_dim + self.rope_dim).transpose(0, 2, 1, 3)
        q_nope, q_rope = split_last(query, self.nope_dim, self.rope_dim, self.explicit_broadcast)
        q_rope = apply_rotary(q_rope, cos, sin, self.interleave, self.explicit_broadcast)

        latent, k_rope = split_last(self.kv_a_proj_with_mqa(x), self.kv_lora_rank, self.rope_dim,
                                    self.explicit_broadcast)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rotary(k_rope.reshape(batch, 1, seq, self.rope_dim), cos, sin, self.interleave,
                              self.explicit_broadcast)
        kv = self.kv_b_proj(latent).reshape(batch, seq, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, value = split_last(kv.transpose(0, 2, 1, 3), self.nope_dim, self.v_dim,
                                    self.explicit_broadcast)

        query = self.q_concat((q_nope, q_rope))
        key = self.k_concat((k_nope, ops.broadcast_to(k_rope, (batch, self.num_heads, seq, self.rope_dim))))
        context = self.core(query, key, value, mask)                    # [B, N, S, V]
        context = context.transpose(0, 2, 1, 3).reshape(batch, seq, self.num_heads * self.v_dim)
        return self.o_proj(context)
