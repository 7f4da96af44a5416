"""Small building blocks shared by attention, decoder blocks and MTP: RMSNorm and dtype lookup.

The bias-free `Linear` ([out, in] weight, computing in `cfg.compute_dtype`) is the MoE module's, so dense,
attention and expert projections share one implementation of the matmul numerics.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from research.deepseek3.moe import Linear  # noqa: F401  (re-exported: the one bias-free linear layer)

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def ms_dtype(name):
    return MS_DTYPES[name]


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, the mean accumulated in `layernorm_compute_type` (fp32 by default).

    Low-precision inputs are upcast for the reduction (bf16 sums of 7168 squares lose the small components),
    then the normalised value is cast back to the input dtype before the weight multiplies it, as in HF.
    """

    def __init__(self, size, cfg):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(size, np.float32), ms_dtype(cfg.param_init_type)), name="weight")
        self.eps = float(cfg.rms_norm_eps)
        self.norm_dtype = ms_dtype(cfg.layernorm_compute_type)

    def construct(self, x):
        input_dtype = x.dtype
        upcast = ops.cast(x, self.norm_dtype)
        variance = ops.mean(ops.square(upcast), -1, keep_dims=True)
        normalised = ops.cast(upcast * ops.rsqrt(variance + self.eps), input_dtype)
        return ops.cast(self.weight, input_dtype) * normalised
