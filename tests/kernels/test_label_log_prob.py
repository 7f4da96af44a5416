"""The fused CPU label log-prob kernels (mindpretrain/kernels/label_log_prob.py) against float64 NumPy.

log_softmax(x)[label] and d/dx of sum(w * it) = w * (onehot - softmax) in float32, PyNative and GRAPH mode; the
same bits on any thread count; a NaN logit gives NaN (the trainer's NaN-loss check must still see it); a label
outside the vocabulary is an error, not a read out of bounds; the output head takes the fused op on CPU and
gives the LogSoftmax + GatherD path's loss and gradients.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.kernels import label_log_prob
from research.deepseek3.head import HeadCrossEntropy


class WeightedSum(nn.Cell):
    """sum(w * op(logits, labels)[0]) and its gradient in the logits."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.grad = ops.GradOperation()

    def loss(self, logits, labels, weights):
        return (self.op(logits, labels)[0] * weights).sum()

    def construct(self, logits, labels, weights):
        return self.op(logits, labels)[0], self.grad(self.loss)(logits, labels, weights)


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


def fused(threads=2):
    assert label_log_prob.available(), "the _label_log_prob extension is not built (pip install -e . builds it)"
    return label_log_prob.fused_label_log_prob(threads=threads)


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
    one = run(fused(threads=1), logits, labels, weights)
    two = run(fused(threads=2), logits, labels, weights)
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


def test_the_head_takes_the_fused_op_on_cpu_and_matches_log_softmax_gather():
    """HeadCrossEntropy in chunks (3 chunks of 8 tokens), fused vs LogSoftmax + GatherD: loss and gradients."""
    rng = np.random.RandomState(1)
    tokens, weight = rng.randn(24, 16).astype(np.float32), (rng.randn(50, 16) * 0.5).astype(np.float32)
    labels = rng.randint(0, 50, 24).astype(np.int32)
    mask = (rng.rand(24) > 0.2).astype(np.float32)
    results = []
    for use_fused in (True, False):
        head = HeadCrossEntropy(50, chunk_elements=8 * 50)
        head.floor_at_weight_gradient = False
        assert head.fused_pick is not None
        if not use_fused:
            head.fused_pick = None
        grads = ops.GradOperation(get_all=True)(head)(Tensor(tokens), Tensor(weight), Tensor(labels), Tensor(mask))
        results.append((head(Tensor(tokens), Tensor(weight), Tensor(labels), Tensor(mask)).asnumpy(),
                        grads[0].asnumpy(), grads[1].asnumpy()))
    (fused_loss, fused_dx, fused_dw), (plain_loss, plain_dx, plain_dw) = results
    np.testing.assert_allclose(fused_loss, plain_loss, rtol=1e-6)
    np.testing.assert_allclose(fused_dx, plain_dx, atol=1e-5)      # sums of 50 products of order 0.1
    np.testing.assert_allclose(fused_dw, plain_dw, atol=1e-5)
