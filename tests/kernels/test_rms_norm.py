"""The fused CPU RMSNorm kernels (mindpretrain/kernels/rms_norm.py) against float64 NumPy: the output and the
gradients in x and the weight, PyNative and GRAPH mode, on rows not divisible by the threads and a width that
is no multiple of the kernels' lanes; and the norm cell takes them in compiled CPU graphs."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.kernels import aot
from mindpretrain.kernels.rms_norm import FusedRMSNorm

EPS = 1e-6


class WeightedNorm(nn.Cell):
    """sum(c * norm(x, w)) for fixed random c: its gradients are the backward of dy = c."""

    def __init__(self, norm, coefficients):
        super().__init__()
        self.norm, self.coefficients = norm, coefficients
        self.grad = ops.GradOperation(get_all=True)

    def loss(self, x, weight):
        return (self.norm(x, weight) * self.coefficients).sum()

    def construct(self, x, weight):
        return self.norm(x, weight), self.grad(self.loss)(x, weight)


def reference(x, weight, dy):
    x, weight, dy = (array.astype(np.float64) for array in (x, weight, dy))
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    xhat = x * r
    g = dy * weight
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    return weight * xhat, dx, (dy * xhat).reshape(-1, x.shape[-1]).sum(0)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_output_and_gradients_match_float64(mode):
    assert aot.available(), "the _cpu_kernels extension is not built (pip install -e . builds it)"
    rng = np.random.RandomState(0)
    x = (rng.randn(3, 7, 40) * 2).astype(np.float32)
    weight = (1 + rng.randn(40) * 0.1).astype(np.float32)
    dy = rng.randn(3, 7, 40).astype(np.float32)
    ms.set_context(mode=mode)
    try:
        y, (dx, dweight) = WeightedNorm(FusedRMSNorm(EPS), Tensor(dy))(Tensor(x), Tensor(weight))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    expected_y, expected_dx, expected_dweight = reference(x, weight, dy)
    np.testing.assert_allclose(y.asnumpy(), expected_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx.asnumpy(), expected_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dweight.asnumpy(), expected_dweight, rtol=1e-5, atol=1e-5)


def test_the_norm_takes_the_fused_kernels_in_compiled_cpu_graphs():
    from conftest import packed_tiny_config
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.layers import RMSNorm

    model_config = DeepseekV3Config(**packed_tiny_config(8))
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        assert isinstance(RMSNorm(32, model_config).float32_core, FusedRMSNorm)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert RMSNorm(32, model_config).float32_core is None                # PyNative: the unexpanded ops
