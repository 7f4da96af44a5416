"""The output head and its cross-entropy, computed in chunks of tokens one after the other.

Why: the logits of one step are the largest tensors of the model (2048 tokens x 32000 vocab = 250 MB in fp32),
and the cross-entropy's backward adds several more of that size. `HeadCrossEntropy` runs head matmul +
log-softmax + pick per chunk of tokens, each chunk made to wait for the previous one (`ops.depend`; without it
the graph may run every chunk's matmul first and hold them all).

Smaller chunks are not cheaper overall: every chunk leaves its own [vocab, H] partial weight gradient, all
summed at the end (AddN), hence the default of 16 M elements per chunk (64 MB of fp32), at most 16 chunks, and
never a chunk of logits smaller than that partial gradient itself: for a wide model (the 1B's 129280 x 2048 head,
1 GiB of fp32 per partial) splitting 256 tokens into two chunks would cost a whole extra [vocab, H] buffer to save
a 66 MB one.
Peak-memory measurements and the alternatives tried and rejected: research/deepseek3/README.md.

The per-token arithmetic is the same either way (matmul in the compute dtype, float32 log-softmax, gather of
the label's log-probability); chunks only split the sum over tokens into partial sums. On CPU the log-softmax
and the gather of a chunk are one fused kernel each way, and up to FUSED_HEAD_MAX_HIDDEN the chunk's matmul
joins them in one op (mindpretrain/kernels/label_log_prob.py); elsewhere, MatMul + LogSoftmax + GatherD, which
the shard strategies describe.
"""
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.kernels.label_log_prob import fused_head_label_log_prob, fused_label_log_prob
from research.deepseek3.layers import ms_dtype, normal_weight

# Widest hidden size the fused head op (matmul + pick through oneDNN's sgemm) takes on CPU: it won at 256 (the
# benchmark model) and lost ~10 % at 2048 (the 1B head) against MatMul + the fused pick (research/deepseek3/README.md).
FUSED_HEAD_MAX_HIDDEN = 512
# Largest chunk of logits, in elements, computed at once (64 MB of fp32; None: one chunk); at most MAX_CHUNKS.
CHUNK_ELEMENTS = 16 * 1024 * 1024
MAX_CHUNKS = 16


def loss_chunk_size(tokens, vocab_size, chunk_elements, max_chunks=MAX_CHUNKS, weight_elements=0):
    """Rows per chunk so that [chunk, vocab] fits `chunk_elements` (raised to `weight_elements`, the size of the
    partial weight gradient each chunk leaves), with at most `max_chunks` chunks (the last one may be shorter).
    Closed form: it runs while the graph is built, where loops would be unrolled."""
    if not chunk_elements:
        return tokens
    chunk_elements = max(chunk_elements, weight_elements)
    chunks = min(max_chunks, max(1, -(-tokens * vocab_size // chunk_elements)))
    return -(-tokens // chunks)


class HeadCrossEntropy(nn.Cell):
    """sum_t w_t * CE(tokens_t @ W^T, labels_t) in float32, chunk by chunk. Labels outside [0, vocab) must carry
    weight 0. Parameter-free: the head weight is an input (the head cell owns or shares it)."""

    def __init__(self, vocab_size, chunk_elements=CHUNK_ELEMENTS):
        super().__init__()
        self.vocab_size = vocab_size
        self.chunk_elements = chunk_elements
        self.floor_at_weight_gradient = True    # no chunk of logits smaller than its [vocab, H] partial gradient
        self.logits_matmul = ops.MatMul(transpose_b=True)           # [c, H] x [V, H]^T
        self.log_softmax = ops.LogSoftmax(-1)
        self.pick = ops.GatherD()
        self.fused_pick = fused_label_log_prob()                    # None off CPU: LogSoftmax + GatherD
        self.fused_head = fused_head_label_log_prob()               # float32 matmul + pick in one op (CPU)
        self.shard_ops = {"logits_matmul": "lm_head", "log_softmax": "loss.log_softmax", "pick": "loss.nll_gather"}

    def construct(self, tokens, weight, labels, weights):
        return -(self.label_log_probs(tokens, weight, labels) * weights).sum()

    def label_log_probs(self, tokens, weight, labels):
        """float32 [T]: log softmax(tokens_t @ W^T)[labels_t] (labels clamped into the vocabulary), chunk by
        chunk; the caller weights and sums them (several losses can share one pass, hence one weight gradient)."""
        count = tokens.shape[0]
        weight_elements = self.vocab_size * tokens.shape[1] if self.floor_at_weight_gradient else 0
        chunk = loss_chunk_size(count, self.vocab_size, self.chunk_elements, weight_elements=weight_elements)
        safe = ops.clamp(labels, 0, self.vocab_size - 1)
        if (self.fused_pick is not None or self.fused_head is not None) and safe.dtype != ms.int32:
            safe = ops.cast(safe, ms.int32)
        picked = ()
        previous = Tensor(0.0, ms.float32)
        for start in range(0, count, chunk):
            rows = ops.depend(tokens[start:start + chunk], previous)   # run the chunks in order, one at a time
            previous = self._chunk_log_probs(rows, weight, safe[start:start + chunk])
            picked = picked + (previous,)
        return picked[0] if len(picked) == 1 else ops.concat(picked)

    def _chunk_log_probs(self, rows, weight, labels):
        """float32 [c]: log_softmax(rows [c, H] @ weight^T)[labels [c]]: one fused op for float32 on CPU up to
        FUSED_HEAD_MAX_HIDDEN, else MatMul, then the fused pick (CPU) or LogSoftmax + GatherD."""
        if self.fused_head is not None and rows.shape[-1] <= FUSED_HEAD_MAX_HIDDEN and rows.dtype == ms.float32 \
                and weight.dtype == ms.float32:
            return self.fused_head(rows, weight, labels)
        logits = self.logits_matmul(rows, weight)
        if logits.dtype != ms.float32:
            logits = ops.cast(logits, ms.float32)
        if self.fused_pick is not None:
            return self.fused_pick(logits, labels)
        return self.pick(self.log_softmax(logits), 1, labels.reshape(-1, 1)).reshape(-1)


class OutputHead(nn.Cell):
    """Logits `hidden @ W^T` (kind `lm_head`) and the chunked cross-entropy over them.

    Holds its own `weight` ([vocab, H], the untied `lm_head.weight`) or, with tied embeddings, the embedding
    Parameter (shared, no extra parameter), so the head is a cell of its own that a pipeline stage can hold.
    """

    def __init__(self, model_config, shared_weight=None):
        super().__init__()
        if shared_weight is None:
            shared_weight = normal_weight((model_config.vocab_size, model_config.hidden_size), model_config)
        self.weight = shared_weight
        self.vocab_size = model_config.vocab_size
        self.compute_dtype = ms_dtype(model_config.compute_dtype)
        self.matmul = ops.MatMul(transpose_b=True)
        self.shard_ops = {"matmul": "lm_head"}
        self.cross_entropy = HeadCrossEntropy(model_config.vocab_size)
        # several losses (main + MTP) share one pass when the [vocab, H] weight gradient each pass leaves is at
        # least a whole chunk of logits (the 1B head: 265 M vs 16 M elements); a narrow head keeps its passes
        # apart, where the merged pass's larger chunk would cost more (tests/planning/test_plan_memory.py probe)
        self.merge_passes = model_config.vocab_size * model_config.hidden_size >= CHUNK_ELEMENTS

    def _compute_weight(self):
        weight = self.weight
        if weight.dtype != self.compute_dtype:
            weight = ops.cast(weight, self.compute_dtype)
        return weight

    def _tokens(self, hidden):
        tokens = hidden.reshape(-1, hidden.shape[-1])
        if tokens.dtype != self.compute_dtype:
            tokens = ops.cast(tokens, self.compute_dtype)
        return tokens

    def construct(self, hidden):
        """hidden [B, S, H] -> float32 logits [B, S, vocab]."""
        logits = self.matmul(self._tokens(hidden), self._compute_weight())
        if logits.dtype != ms.float32:
            logits = ops.cast(logits, ms.float32)
        return logits.reshape(hidden.shape[:-1] + (self.vocab_size,))

    def masked_cross_entropy(self, hidden, labels, loss_mask, reduction="mean"):
        """Sum(mask * CE) / Sum(mask) in float32 over hidden [B, S, H], labels int [B, S], loss_mask [B, S];
        reduction "sum": Sum(mask * CE) alone (per-token loss: the caller's mask carries the normalisation)."""
        return self.masked_cross_entropies(((hidden, labels, loss_mask),), reduction)[0]

    def masked_cross_entropies(self, segments, reduction="mean"):
        """`masked_cross_entropy` of each (hidden, labels, loss_mask) in `segments` (the main model's and each
        MTP depth's); with `merge_passes`, through ONE head pass over all their tokens. Why: every pass leaves
        its own [vocab, H] weight gradient until they are summed (1 GiB of fp32 each for the 1B head)."""
        weight = self._compute_weight()                  # cast once for every segment
        tokens = tuple(self._tokens(hidden) for hidden, _, _ in segments)
        labels = tuple(segment_labels.reshape(-1) for _, segment_labels, _ in segments)
        weights = tuple(ops.cast(mask, ms.float32).reshape(-1) for _, _, mask in segments)
        if len(segments) == 1:
            log_probs = self.cross_entropy.label_log_probs(tokens[0], weight, labels[0])
        elif self.merge_passes:
            log_probs = self.cross_entropy.label_log_probs(ops.concat(tokens), weight, ops.concat(labels))
        else:
            log_probs = ops.concat(tuple(self.cross_entropy.label_log_probs(segment_tokens, weight, segment_labels)
                                         for segment_tokens, segment_labels in zip(tokens, labels)))
        losses = ()
        start = 0
        for segment_weights in weights:
            count = segment_weights.shape[0]
            total = -(log_probs[start:start + count] * segment_weights).sum()
            start += count
            if reduction != "sum":
                denominator = segment_weights.sum()
                total = total / ops.select(denominator > 0, denominator, ops.ones_like(denominator))
            losses = losses + (total,)
        return losses
