"""RMSNorm of float32 rows as one fused CPU kernel each way (rms_norm.cpp): `weight * (x * r)` with
r = rsqrt(mean(x^2) + eps), and its gradient in x and the weight.

Why: in compiled CPU graphs the norm otherwise runs as a dozen kernels forward and backward
(research/deepseek3/layers.py ExpandedRMSNormCore, each a pass over [rows, H]); the fused pair keeps only the
[rows] factor r beside its input. None where it does not apply (`aot.available()`); the caller keeps the
expanded form then. Agrees with it within float32 rounding (tests/kernels/).
"""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.kernels import aot


class FusedRMSNorm(nn.Cell):
    """(x float32 [..., H], weight float32 [H]) -> weight * x * rsqrt(mean(x^2, -1) + eps)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = Tensor(np.array([eps], np.float32))
        backward = aot.custom_op("RmsNormBackward", lambda x, weight, *_: (x, weight),
                                 lambda x, weight, *_: (x, weight))

        def bprop(x, weight, eps, out, dout):
            dx, dweight = backward(x, weight, out[1], dout[0])
            return dx, dweight, ops.zeros_like(eps)

        self.forward = aot.custom_op("RmsNormForward", lambda x, weight, eps: (x, x[:-1]),
                                     lambda x, *_: (ms.float32, ms.float32), bprop)

    def construct(self, x, weight):
        return self.forward(x, weight, self.eps)[0]


def fused_rms_norm(eps):
    """A `FusedRMSNorm` cell, or None when not `aot.available()`."""
    return FusedRMSNorm(eps) if aot.available() else None
