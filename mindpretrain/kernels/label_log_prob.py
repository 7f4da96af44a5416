"""log_softmax(logits)[label] of each row as one fused CPU kernel each way (label_log_prob.cpp), for the output
head's cross-entropy.

Why: on CPU, MindSpore's LogSoftmax + GatherD and their gradients make four passes over the [tokens, vocab]
logits with a scalar exp, and the LogSoftmaxGrad kernel is slow on some CPUs: one [512, 32000] chunk took 205 ms
forward + backward against 36 ms fused on a 2-core AVX2 machine (numbers and command: research/deepseek3/
README.md). The forward keeps only each row's log-sum-exp beside the logits; the backward writes
dout * (onehot - softmax) in one pass.

`fused_label_log_prob()` gives the op, or None where it does not apply, and the caller keeps LogSoftmax +
GatherD then: off CPU (Ascend has its own fused kernels, and the head's shard strategies describe the two ops)
or when the extension was not built. The two agree within float32 rounding (tests/kernels/).
"""
import mindspore as ms
from mindspore import ops

from mindpretrain.utils.threads import default_threads

try:
    from mindpretrain.kernels import _label_log_prob
except ImportError:          # extension not built: callers fall back to LogSoftmax + GatherD
    _label_log_prob = None


def _kernel(symbol):
    return f"{_label_log_prob.__file__}:{symbol}"


def _per_row(logits_shape, *_):
    return (logits_shape[0],)


def available():
    """Whether the fused op can run here: the extension is built and the graph runs on CPU."""
    return _label_log_prob is not None and ms.get_context("device_target") == "CPU"


def fused_label_log_prob(threads=None):
    """A primitive (logits float32 [R, V], labels int32 [R] in [0, V)) -> (log_softmax(logits)[label] [R],
    log-sum-exp [R]), differentiable in the logits; None when not `available()`."""
    if not available():
        return None
    _label_log_prob.set_threads(int(threads or default_threads()))
    backward = ops.Custom(_kernel("LabelLogProbBackward"), out_shape=lambda logits, *_: logits,
                          out_dtype=lambda logits, *_: logits, func_type="aot")

    def bprop(logits, labels, out, dout):
        return backward(logits, labels, out[1], dout[0]), ops.zeros_like(labels)

    return ops.Custom(_kernel("LabelLogProbForward"),
                      out_shape=lambda logits, labels: (_per_row(logits), _per_row(logits)),
                      out_dtype=lambda logits, labels: (ms.float32, ms.float32), func_type="aot", bprop=bprop)
