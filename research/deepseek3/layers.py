"""Building blocks shared by attention, decoder blocks, MoE, MTP and the head: Linear, RMSNorm, SwiGLU, dtype lookup.

Every cell that computes through primitives the parallel plan may cut declares them in `shard_ops`
({attribute name: op kind}); `mindpretrain.parallel.strategies.apply_shard_strategies` walks the cells and gives
each declared primitive the strategy of its kind. That is why these cells call primitives held as attributes
(`self.matmul(...)`) instead of functional ops: a functional op has no object to carry a strategy.
The op kind of a projection depends on where it sits (`attention.q_b_proj`, `mlp.down_proj`, ...), so the
cells take it as a constructor argument.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindpretrain.kernels.rms_norm import fused_rms_norm

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def broadcasts_explicitly(device_target=None, mode=None):
    """Whether element-wise ops get their smaller operand expanded with `ops.broadcast_to` first: in GRAPH mode
    everywhere except Ascend. Why: in MindSpore's compiled CPU graphs a Mul/Add that broadcasts implicitly (a [H]
    weight or a [N, 1] factor against [N, H]) holds about four extra full-size buffers per op, forward and
    backward, where the explicit BroadcastTo + same-shape op holds one (10 RMSNorms fwd+bwd over 2048 x 256:
    378 MiB vs 71 MiB; research/deepseek3/README.md). In PyNative the expanded operand is one more tensor kept
    for backward instead, and Ascend keeps the implicit form, which its parallel plan's strategies describe.
    Decided when a cell is built (the trainer sets the mode and device first)."""
    mode = ms.get_context("mode") if mode is None else mode
    return mode == ms.GRAPH_MODE and str(device_target or ms.get_context("device_target")).upper() != "ASCEND"


def expand_to(small, shape, explicit):
    """`small` broadcast to `shape` when `explicit` (see `broadcasts_explicitly`) and not of that shape yet,
    else unchanged."""
    return ops.broadcast_to(small, shape) if explicit and small.shape != tuple(shape) else small


def split_last(x, first, second, use_split):
    """x [..., first + second] -> its two parts along the last axis: through Split (Slice kernels) when
    `use_split` (compiled CPU graphs, where `x[..., :first]`'s StridedSlice took ~0.6 ms per call on the
    benchmark's shapes), else as slices."""
    if use_split:
        return ops.split(x, (first, second), -1)
    return x[..., :first], x[..., first:]


def ms_dtype(name):
    return MS_DTYPES[name]


def normal_weight(shape, model_config):
    """A `weight` Parameter drawn from N(0, initializer_range) in `param_init_type`."""
    return Parameter(initializer(Normal(sigma=model_config.initializer_range), shape,
                                 ms_dtype(model_config.param_init_type)), name="weight")


class Linear(nn.Cell):
    """Bias-free `x @ W^T` with an HF-shaped weight [out, in], computing in `model_config.compute_dtype`.

    Any leading dimensions are flattened to tokens for one 2-D MatMul (`transpose_b`, so no transposed copy
    of the weight is made); the strategy of `shard_kind` is written for that [tokens, in] x [out, in] product.
    """

    def __init__(self, in_features, out_features, model_config, shard_kind):
        super().__init__()
        self.out_features = out_features
        self.weight = normal_weight((out_features, in_features), model_config)
        self.compute_dtype = ms_dtype(model_config.compute_dtype)
        self.matmul = ops.MatMul(transpose_b=True)
        self.shard_ops = {"matmul": shard_kind}

    def construct(self, x):
        leading = x.shape[:-1]
        if x.dtype != self.compute_dtype:
            x = ops.cast(x, self.compute_dtype)
        weight = self.weight
        if weight.dtype != self.compute_dtype:
            weight = ops.cast(weight, self.compute_dtype)
        out = self.matmul(x.reshape(-1, x.shape[-1]), weight)
        return out.reshape(leading + (self.out_features,))


class ExpandedRMSNormCore(nn.Cell):
    """`weight * x * rsqrt(mean(x^2) + eps)` over float32 x [..., H] with every operand expanded first, and a
    hand-written backward (used by RMSNorm where it broadcasts explicitly and everything is float32):

        xhat = x * r;  dweight = sum_rows(dout * xhat);  g = dout * weight;  dx = r * (g - xhat * mean(g * xhat))

    Why: autodiff of the expanded forward reduces each BroadcastTo's gradient with a ReduceSum over the leading
    axes, which the CPU backend runs at a few ns per element; the sums here are MatMuls with a ones vector
    (the weight gradient [1, N] x [N, H], the row means [N, H] x [H, 1]), several times faster than
    ReduceSum/ReduceMean on this backend. Same values up to float32 summation order."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps
        self.matmul = ops.MatMul()

    def construct(self, x, weight):
        return ops.broadcast_to(weight, x.shape) * (x * ops.broadcast_to(self._rsqrt(x), x.shape))

    def _row_mean(self, values):
        """mean over the last axis, keeping it: [..., H] -> [..., 1]."""
        width = values.shape[-1]
        rows = values.reshape(-1, width)
        return (self.matmul(rows, ops.ones((width, 1), values.dtype)) * (1.0 / width)).reshape(
            values.shape[:-1] + (1,))

    def _rsqrt(self, x):
        return ops.rsqrt(self._row_mean(x * x) + self.eps)

    def bprop(self, x, weight, out, dout):
        rows = x.size // x.shape[-1]
        factor = ops.broadcast_to(self._rsqrt(x), x.shape)
        normalised = x * factor
        grad_weight = self.matmul(ops.ones((1, rows), x.dtype),
                                  (dout * normalised).reshape(rows, x.shape[-1])).reshape(weight.shape)
        scaled = dout * ops.broadcast_to(weight, x.shape)
        mean = ops.broadcast_to(self._row_mean(scaled * normalised), x.shape)
        return factor * (scaled - normalised * mean), grad_weight


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, the mean accumulated in `layernorm_compute_type` (fp32 by default).

    Low-precision inputs are upcast for the reduction (bf16 sums of 7168 squares lose the small components),
    then the normalised value is cast back to the input dtype before the weight multiplies it, as in HF.
    `shard_kind` names the layout of the input: "norm" for hidden states [B, S, H] (sequence-parallel),
    "attention.latent_norm" for the q/kv latents (split on batch only); its sub-kinds cover every primitive.
    """

    def __init__(self, size, model_config, shard_kind="norm"):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(size, np.float32), ms_dtype(model_config.param_init_type)),
                                name="weight")
        self.eps = float(model_config.rms_norm_eps)
        self.norm_dtype = ms_dtype(model_config.layernorm_compute_type)
        self.square = ops.Square()
        self.mean = ops.ReduceMean(keep_dims=True)
        self.eps_add = ops.Add()
        self.rsqrt = ops.Rsqrt()
        self.normalise = ops.Mul()
        self.weight_mul = ops.Mul()
        self.explicit_broadcast = broadcasts_explicitly()
        fp32 = self.norm_dtype == ms.float32 and ms_dtype(model_config.param_init_type) == ms.float32
        # float32 in compiled CPU graphs: the fused kernels where built, else the expanded form
        self.float32_core = None
        if self.explicit_broadcast and fp32:
            self.float32_core = fused_rms_norm(self.eps)
            if self.float32_core is None:
                self.float32_core = ExpandedRMSNormCore(self.eps)
        self.shard_ops = {"square": f"{shard_kind}.square", "mean": f"{shard_kind}.mean",
                          "eps_add": f"{shard_kind}.eps_add", "rsqrt": f"{shard_kind}.rsqrt",
                          "normalise": f"{shard_kind}.normalise", "weight_mul": shard_kind}

    def construct(self, x):
        input_dtype = x.dtype
        if self.float32_core is not None and input_dtype == ms.float32:
            return self.float32_core(x, self.weight)
        upcast = x if input_dtype == self.norm_dtype else ops.cast(x, self.norm_dtype)
        variance = self.mean(self.square(upcast), -1)
        factor = expand_to(self.rsqrt(self.eps_add(variance, self.eps)), upcast.shape, self.explicit_broadcast)
        normalised = self.normalise(upcast, factor)
        if input_dtype != self.norm_dtype:
            normalised = ops.cast(normalised, input_dtype)
        weight = self.weight
        if weight.dtype != input_dtype:
            weight = ops.cast(weight, input_dtype)
        return self.weight_mul(expand_to(weight, normalised.shape, self.explicit_broadcast), normalised)


class SwiGLU(nn.Cell):
    """`down(silu(gate(x)) * up(x))`: the dense FFN of the first `first_k_dense_replace` layers and the MoE's
    shared experts.

    Parameters `gate_proj/up_proj/down_proj.weight` as in HF. Runs on tokens [B*S, features] so the element-wise
    primitives have the 2-D layout their strategies describe. `kind_prefix` starts the op kind of every primitive
    and projection: "mlp." (dense FFN: `mlp.gate_proj`, `mlp.silu`, ...) or "moe.shared_" (shared experts:
    `moe.shared_gate_proj`, `moe.shared_silu`, ...), the weight kinds of research/deepseek3/sharding.py.
    """

    def __init__(self, hidden_size, intermediate_size, model_config, kind_prefix="mlp."):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, model_config, f"{kind_prefix}gate_proj")
        self.up_proj = Linear(hidden_size, intermediate_size, model_config, f"{kind_prefix}up_proj")
        self.down_proj = Linear(intermediate_size, hidden_size, model_config, f"{kind_prefix}down_proj")
        self.sigmoid = ops.Sigmoid()
        self.silu_mul = ops.Mul()
        self.gate_mul = ops.Mul()
        self.shard_ops = {"sigmoid": f"{kind_prefix}silu", "silu_mul": f"{kind_prefix}silu_mul",
                          "gate_mul": f"{kind_prefix}swiglu_mul"}

    def construct(self, x):
        leading = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        gate = self.gate_proj(tokens)
        activated = self.silu_mul(gate, self.sigmoid(gate))          # silu(g) = g * sigmoid(g)
        out = self.down_proj(self.gate_mul(activated, self.up_proj(tokens)))
        return out.reshape(leading + (out.shape[-1],))


class Embedding(nn.Cell):
    """Token embedding `weight[ids]` through one Gather primitive (kind `embedding.gather`).

    `shared_weight` makes the cell hold an existing Parameter (the MTP blocks' copy of the main embedding, for
    pipeline placement): it adds no parameter, and `parameters_and_names()` still reports the weight once,
    under the first cell path holding it (the model re-derives parameter names from those paths).
    """

    def __init__(self, model_config, shared_weight=None):
        super().__init__()
        if shared_weight is None:
            shared_weight = normal_weight((model_config.vocab_size, model_config.hidden_size), model_config)
        self.weight = shared_weight
        self.compute_dtype = ms_dtype(model_config.compute_dtype)
        self.gather = ops.Gather()
        self.shard_ops = {"gather": "embedding.gather"}

    def construct(self, ids):
        embedded = self.gather(self.weight, ids, 0)
        if embedded.dtype != self.compute_dtype:
            embedded = ops.cast(embedded, self.compute_dtype)
        return embedded

