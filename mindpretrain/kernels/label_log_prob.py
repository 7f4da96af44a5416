"""log_softmax(logits)[label] of each row as one fused CPU kernel each way (label_log_prob.cpp), for the output
head's cross-entropy.

Why: on CPU, MindSpore's LogSoftmax + GatherD and their gradients make four passes over the [tokens, vocab]
logits with a scalar exp, and the LogSoftmaxGrad kernel is slow on some CPUs: one [512, 32000] chunk took 205 ms
forward + backward against 36 ms fused on a 2-core AVX2 machine (numbers and command: research/deepseek3/
README.md). The forward keeps only each row's log-sum-exp beside the logits; the backward writes
dout * (onehot - softmax) in one pass.

`fused_head_label_log_prob()` goes one step further: the head's matmul and the label log-prob in one op, whose
matmuls (logits forward; d tokens and d weight backward) call oneDNN's sgemm from the libdnnl that MindSpore
ships, split over threads, and the [tokens, vocab] gradient of the logits never enters MindSpore's memory pool.

Both give None where they do not apply (`aot.available()`; the head op also needs oneDNN's sgemm), and the
caller keeps MatMul + LogSoftmax + GatherD then. They agree with the unfused ops within float32 rounding
(tests/kernels/).
"""
import mindspore as ms
from mindspore import nn, ops

from mindpretrain.kernels import aot


def _per_row(logits_shape, *_):
    return (logits_shape[0],)


class FusedLabelLogProb(nn.Cell):
    """(logits float32 [R, V], labels int32 [R] in [0, V)) -> log_softmax(logits)[label] [R], differentiable in
    the logits."""

    def __init__(self):
        super().__init__()
        backward = aot.custom_op("LabelLogProbBackward", lambda logits, *_: logits, lambda logits, *_: logits)

        def bprop(logits, labels, out, dout):
            return backward(logits, labels, out[1], dout[0]), ops.zeros_like(labels)

        self.forward = aot.custom_op("LabelLogProbForward",
                                     lambda logits, labels: (_per_row(logits), _per_row(logits)),
                                     lambda logits, labels: (ms.float32, ms.float32), bprop)

    def construct(self, logits, labels):
        return self.forward(logits, labels)[0]


class FusedHeadLabelLogProb(nn.Cell):
    """(tokens float32 [R, H], weight float32 [V, H], labels int32 [R] in [0, V)) ->
    log_softmax(tokens @ weight^T)[label] [R], differentiable in the tokens and the weight."""

    def __init__(self):
        super().__init__()
        backward = aot.custom_op("HeadLabelLogProbBackward", lambda tokens, weight, *_: (tokens, weight),
                                 lambda tokens, weight, *_: (tokens, weight))

        def bprop(tokens, weight, labels, out, dout):
            dtokens, dweight = backward(tokens, weight, labels, out[2], out[1], dout[0])
            return dtokens, dweight, ops.zeros_like(labels)

        # outputs: the label log-probs, the rows' log-sum-exp and the logits (both kept for the backward)
        self.forward = aot.custom_op(
            "HeadLabelLogProbForward",
            lambda tokens, weight, labels: (_per_row(tokens), _per_row(tokens), (tokens[0], weight[0])),
            lambda tokens, *_: (ms.float32, ms.float32, ms.float32), bprop)

    def construct(self, tokens, weight, labels):
        return self.forward(tokens, weight, labels)[0]


def fused_label_log_prob():
    """A `FusedLabelLogProb` cell, or None when not `aot.available()`."""
    return FusedLabelLogProb() if aot.available() else None


def fused_head_label_log_prob():
    """A `FusedHeadLabelLogProb` cell, or None when not `aot.available()` or oneDNN's sgemm is not found."""
    return FusedHeadLabelLogProb() if aot.available() and aot.sgemm_loaded() else None
