"""The fused CPU label log-prob kernels (mindpretrain/kernels/label_log_prob.py) against float64 NumPy.

log_softmax(x)[label] and d/dx of sum(w * it) = w * (onehot - softmax) in float32, PyNative and GRAPH mode; the
same bits on any thread count; a NaN logit gives NaN (the trainer's NaN-loss check must still see it); a label
outside the vocabulary is an error, not a read out of bounds; the output head takes the fused ops on CPU (the
pick alone, and the head's matmul + pick through oneDNN's sgemm) and gives the MatMul + LogSoftmax + GatherD
path's loss and gradients.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.kernels import aot, label_log_prob
from mindpretrain.utils.threads import default_threads
from research.deepseek3.head import HeadCrossEntropy


class WeightedSum(nn.Cell):
    """sum(w * op(logits, labels)) and its gradient in the logits."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.grad = ops.GradOperation()

    def loss(self, logits, labels, weights):
        return (self.op(logits, labels) * weights).sum()

    def construct(self, logits, labels, weights):
        return self.op(logits, labels), self.grad(self.loss)(logits, labels, weights)


def reference(logits, labels, weights):
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    lse = top + np.log(np.exp(x - top).sum(-1, keepdims=True))
    log_probs = x - lse
    picked = log_probs[np.arange(len(labels)), labels]
    grad = -np.exp(log_probs) * weights[:, None]
    grad[np.arange(len(labels)), labels] += weights
    return picked, grad


def run(op, logits, labels, weights, mode=ms.PYNATIVE_MODE):
    ms.set_context(mode=mode)
    try:
        picked, grad = WeightedSum(op)(Tensor(logits), Tensor(labels), Tensor(weights))
        return picked.asnumpy(), grad.asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def batch(rows=37, vocab=1003, scale=3.0, seed=0):
    """Rows not divisible by the threads, a vocabulary not a multiple of the kernel's 16 lanes, both end labels."""
    rng = np.random.RandomState(seed)
    logits = (rng.randn(rows, vocab) * scale).astype(np.float32)
    labels = rng.randint(0, vocab, rows).astype(np.int32)
    labels[0], labels[-1] = 0, vocab - 1
    return logits, labels, rng.rand(rows).astype(np.float32)


def fused():
    assert aot.available(), "the _cpu_kernels extension is not built (pip install -e . builds it)"
    return label_log_prob.fused_label_log_prob()


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("scale", [3.0, 300.0], ids=["moderate", "wide-logits"])
def test_values_and_gradient_match_float64(mode, scale):
    logits, labels, weights = batch(scale=scale)
    picked, grad = run(fused(), logits, labels, weights, mode)
    expected_picked, expected_grad = reference(logits, labels, weights)
    # float32 x - lse alone is off by half an ulp of x (3e-5 at |x| ~ 900): relative error of that order
    rtol = 1e-4 if scale > 10 else 1e-5
    np.testing.assert_allclose(picked, expected_picked, rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=rtol, atol=1e-6)


def test_one_thread_and_two_give_the_same_bits():
    logits, labels, weights = batch(rows=64, vocab=4096)
    try:
        aot.set_threads(1)
        one = run(fused(), logits, labels, weights)
        aot.set_threads(2)
        two = run(fused(), logits, labels, weights)
    finally:
        aot.set_threads(default_threads())
    for single, split in zip(one, two):
        assert np.array_equal(single, split)


def test_a_nan_logit_gives_a_nan_log_prob():
    logits, labels, weights = batch(rows=4, vocab=64)
    logits[2, 5] = np.nan
    picked, _ = run(fused(), logits, labels, weights)
    assert np.isnan(picked[2]) and np.isfinite(np.delete(picked, 2)).all()


def test_a_label_outside_the_vocabulary_is_refused():
    logits, labels, weights = batch(rows=4, vocab=64)
    labels[1] = 64
    with pytest.raises(RuntimeError, match="Custom|LabelLogProbForward"):
        run(fused(), logits, labels, weights)


def head_loss_and_grads(variant, tokens, weight, labels, mask):
    """HeadCrossEntropy in chunks of 8 tokens: "head" (matmul + pick fused), "pick" (MatMul, then the fused
    pick) or "plain" (MatMul + LogSoftmax + GatherD): loss, d tokens, d weight."""
    head = HeadCrossEntropy(weight.shape[0], chunk_elements=8 * weight.shape[0])
    head.floor_at_weight_gradient = False
    assert head.fused_head is not None and head.fused_pick is not None
    if variant != "head":
        head.fused_head = None
    if variant == "plain":
        head.fused_pick = None
    inputs = (Tensor(tokens), Tensor(weight), Tensor(labels), Tensor(mask))
    grads = ops.GradOperation(get_all=True)(head)(*inputs)
    return head(*inputs).asnumpy(), grads[0].asnumpy(), grads[1].asnumpy()


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_the_head_takes_the_fused_ops_on_cpu_and_matches_matmul_log_softmax_gather(mode):
    """Three chunks of 8 tokens, a vocabulary of 50 (no multiple of the kernels' lanes), 20 % masked."""
    rng = np.random.RandomState(1)
    tokens, weight = rng.randn(24, 16).astype(np.float32), (rng.randn(50, 16) * 0.5).astype(np.float32)
    labels = rng.randint(0, 50, 24).astype(np.int32)
    mask = (rng.rand(24) > 0.2).astype(np.float32)
    # the reference in PyNative: MindSpore 2.10's GRAPH compile of GatherD's bprop fails now and then in a
    # process that compiled other variants of the cell before ("Bprop GatherDGradV2 ... pointer is null")
    results = {"plain": head_loss_and_grads("plain", tokens, weight, labels, mask)}
    ms.set_context(mode=mode)
    try:
        results.update({variant: head_loss_and_grads(variant, tokens, weight, labels, mask)
                        for variant in ("head", "pick")})
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    plain_loss, plain_dx, plain_dw = results["plain"]
    for variant in ("head", "pick"):
        loss, dx, dw = results[variant]
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
        np.testing.assert_allclose(dx, plain_dx, atol=1e-5)      # sums of 50 products of order 0.1
        np.testing.assert_allclose(dw, plain_dw, atol=1e-5)
