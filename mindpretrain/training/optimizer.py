"""AdamW with fp32 moments and bias correction, updated in place by MindSpore's fused kernel.

Why not `nn.AdamWeightDecay`: it has no bias correction, so its first steps differ from the
AdamW that Megatron, PyTorch and MindFormers' `AdamW` apply. This one follows Loshchilov & Hutter:
    p <- p - lr * wd * p - lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m / bc1,  v_hat = v / bc2,
with bc1 = 1 - beta1^t and bc2 = 1 - beta2^t (both terms use the p from before the step).

Why the fused primitive: written as tensor arithmetic, every `*`, `/`, `sqrt` of the update makes a
full-size temporary, and the compiled graph keeps several alive at once (a 129280 x 2048 fp32
embedding needs 1 GiB per temporary; the 1B run died allocating one). `ops.AdamWeightDecay`
(CPU, GPU and Ascend kernels) updates var, m and v in place, element by element, with no
temporaries, and computes (CPU kernel, nnacl `AdamWeightDecayFp32`; checked against NumPy)
    m += (g - m) * (1 - beta1);   v += (g * g - v) * (1 - beta2)
    p -= lr' * (m / (sqrt(v) + eps') + wd' * p)
which has no bias correction. It is folded into the kernel's scalars. With s = sqrt(bc2):
    lr * m_hat / (sqrt(v_hat) + eps) = lr * (m / bc1) / (sqrt(v) / s + eps)
                                     = (lr * s / bc1) * m / (sqrt(v) + eps * s)
so lr' = lr * s / bc1 and eps' = eps * s; and lr' * wd' = lr * wd gives wd' = wd * bc1 / s.
The result is the bias-corrected AdamW above, exactly up to fp32 rounding of the scalars.
One update of that embedding allocated 18 GiB of temporaries as tensor arithmetic, 18 MiB with
the kernel (benchmarks/bench_adamw_memory.py).

The CPU kernel still takes three buffers of the parameter's size from MindSpore's memory pool for its
outputs (var, m, v; the pool's peak of one update of a 256 MiB parameter is 768 MiB), and pool memory,
once taken, is what later graphs reuse and touch. So parameters of CHAIN_MIN_ELEMENTS or more (the 1B
model's 129280 x 2048 vocabulary matrices) take `chained_update` in GRAPH mode on CPU: the same formula as
in-place primitives, with one temporary (sqrt(v)), overwriting the gradient it is given. It is slower
(about eleven passes over the tensor instead of one), which is why only the largest parameters take it.

State lives in Parameters named `exp_avg.<param>`, `exp_avg_sq.<param>` and `adam_step`, so a
checkpoint stores it under readable names and restores it bit-exactly. The moments are float32
whatever the parameter dtype (the parameters themselves are the fp32 master weights; the model
casts to its compute dtype inside). Weight decay applies to matrices only (ndim >= 2): norms and
biases are not decayed, as in Megatron's default parameter groups. The fused kernel needs var, m
and v of one dtype, so a parameter that is not float32 (a warned-about configuration) takes the
same formula as tensor arithmetic instead, with its temporaries.
"""
import math

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import InplaceAddExt, InplaceAddsExt, InplaceCopy, InplaceDiv, InplaceMul

from mindpretrain.validation import require
from mindpretrain.registry import register


# Parameters of at least this many elements (64 MiB of fp32; the 1B model's vocabulary matrices, not the CPU
# benchmark's) take `chained_update` instead of the fused kernel: memory over speed where memory is the limit.
CHAIN_MIN_ELEMENTS = 16 * 1024 * 1024


def _composite_update(plain, decay, param, exp_avg, exp_avg_sq, grad):
    """The bias-corrected formula as tensor arithmetic (parameters that are not float32)."""
    beta1, beta2, lr, eps, weight_decay, bias_correction1, bias_correction2 = plain
    param_fp32 = ops.cast(param, ms.float32)
    next_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    next_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    if decay:
        param_fp32 = param_fp32 - lr * weight_decay * param_fp32
    denominator = ops.sqrt(next_avg_sq / bias_correction2) + eps
    param_fp32 = param_fp32 - lr * (next_avg / bias_correction1) / denominator
    ops.assign(exp_avg, next_avg)
    ops.assign(exp_avg_sq, next_avg_sq)
    return ops.assign(param, ops.cast(param_fp32, param.dtype))


class InPlaceSteps:
    """The in-place element-wise primitives of `chained_update` (one instance each, shared by all parameters)."""

    def __init__(self):
        self.mul, self.add, self.add_scalar = InplaceMul(), InplaceAddExt(), InplaceAddsExt()
        self.copy, self.div = InplaceCopy(), InplaceDiv()


def chained_update(steps, chained, eps, decay, param, exp_avg, exp_avg_sq, grad):
    """The bias-corrected AdamW step as a chain of in-place ops, for parameters too large for the fused kernel,
    whose CPU kernel takes three fresh buffers of the parameter's size from the memory pool for its outputs
    (var, m, v). Here the one new buffer is sqrt(v); `grad` is overwritten (the caller's gradient is consumed).
    `chained` = [1]-shaped (k1 = (1 - beta1) * scale, k2 = (1 - beta2) / (1 - beta1)^2, beta1, beta2,
    1 - lr * wd, 1 / sqrt(bc2), -lr / bc1):
        m = beta1 m + k1 g;  g' = k2 (k1 g)^2 = (1 - beta2) (scale g)^2;  v = beta2 v + g'
        p = p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    Each op is ordered after the last reader of what it overwrites (ops.depend)."""
    k1, k2, beta1, beta2, decay_factor, inverse_root2, step_size = chained
    scaled = steps.mul(grad, k1)                                            # k1 g
    avg = steps.add(steps.mul(exp_avg, beta1), scaled)
    squared = steps.mul(ops.depend(scaled, avg), ops.depend(scaled, avg))    # k1^2 g^2, after m has read k1 g
    avg_sq = steps.add(steps.mul(exp_avg_sq, beta2), steps.mul(squared, k2))
    denominator = steps.add_scalar(steps.mul(ops.sqrt(avg_sq), inverse_root2), eps)
    update = steps.mul(steps.div(steps.copy(ops.depend(squared, avg_sq), avg), denominator), step_size)
    if decay:
        param = steps.mul(param, decay_factor)
    return steps.add(param, update)


def _update_one(fused_adamw, plain, folded, in_place, decay, param, exp_avg, exp_avg_sq, grad):
    """One parameter: the fused in-place kernel for float32, the composite formula otherwise.
    Returns the updated parameter, for the next update to be ordered after it."""
    if grad.dtype != ms.float32:
        grad = ops.cast(grad, ms.float32)
    if not in_place:
        return _composite_update(plain, decay, param, exp_avg, exp_avg_sq, grad)
    beta1, beta2 = plain[0], plain[1]
    lr_folded, eps_folded, decay_folded, zero = folded
    return fused_adamw(param, exp_avg, exp_avg_sq, lr_folded, beta1, beta2, eps_folded,
                       decay_folded if decay else zero, grad)[0]


@register("optimizer")
class AdamW(nn.Cell):
    """`optimizer(grads, lr, grad_scale=None)` updates `params` in place and returns the new step count;
    `lr` is a float32 scalar tensor, `grad_scale` (e.g. the clipping factor) multiplies the gradients.

    The parameters are updated one after another (each update ordered after the previous one), so
    at most one parameter's temporaries are alive: its scaled gradient, or the composite formula's
    intermediates. Scaling all gradients first, as a separate map, keeps a full copy of them."""

    def __init__(self, params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, learning_rate=None, **unused):
        super().__init__()
        require(not unused, "optimizer", sorted(unused), "are unknown keys for AdamW")
        require(len(betas) == 2 and all(0 <= beta < 1 for beta in betas), "optimizer.betas", betas,
                "must be two numbers in [0, 1)")
        require(eps > 0, "optimizer.eps", eps, "must be positive")
        require(weight_decay >= 0, "optimizer.weight_decay", weight_decay, "must be non-negative")
        self.parameters = ms.ParameterTuple(params)
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        for moment in list(self.exp_avg) + list(self.exp_avg_sq):
            moment.set_dtype(ms.float32)
        # shape [1], not a scalar: the safetensors writer stores 0-d arrays as [1] (np.ascontiguousarray)
        self.adam_step = Parameter(Tensor([0.0], ms.float32), name="adam_step", requires_grad=False)
        self.decay_flags = tuple(len(param.shape) >= 2 for param in params)
        self.in_place_flags = tuple(param.dtype == ms.float32 for param in params)
        # CPU only (the three output buffers are the CPU kernel's), GRAPH mode only (the in-place primitives have
        # no PyNative CPU kernel: "The kernel InplaceMul unregistered")
        chain = ms.get_context("mode") == ms.GRAPH_MODE and str(ms.get_context("device_target")).upper() == "CPU"
        self.chained_flags = tuple(chain and flag and math.prod(param.shape) >= CHAIN_MIN_ELEMENTS
                                   for flag, param in zip(self.in_place_flags, params))
        self.eps_value = float(eps)
        self.beta1 = Tensor(float(betas[0]), ms.float32)
        self.beta2 = Tensor(float(betas[1]), ms.float32)
        self.eps = Tensor(float(eps), ms.float32)
        self.weight_decay = Tensor(float(weight_decay), ms.float32)
        self.one = Tensor(1.0, ms.float32)
        self.zero = Tensor(0.0, ms.float32)
        self.fused_adamw = ops.AdamWeightDecay()
        self.steps = InPlaceSteps()

    def state_parameters(self):
        """Every state Parameter, by its checkpoint name (without the `optimizer.` prefix)."""
        state = {param.name: param for param in list(self.exp_avg) + list(self.exp_avg_sq)}
        state["adam_step"] = self.adam_step
        return state

    def construct(self, grads, lr, grad_scale=None):
        step = self.adam_step + self.one
        ops.assign(self.adam_step, step)
        bias_correction1 = self.one - ops.pow(self.beta1, step)
        bias_correction2 = self.one - ops.pow(self.beta2, step)
        plain = (self.beta1, self.beta2, lr, self.eps, self.weight_decay, bias_correction1, bias_correction2)
        root2 = ops.sqrt(bias_correction2)
        folded = (lr * root2 / bias_correction1, self.eps * root2, self.weight_decay * bias_correction1 / root2,
                  self.zero)
        chained = self._chained_scalars(lr, grad_scale, bias_correction1, root2) if any(self.chained_flags) else None
        done = step
        for index in range(len(self.parameters)):
            grad = ops.depend(grads[index], done)
            if self.chained_flags[index]:
                if grad.dtype != ms.float32:
                    grad = ops.cast(grad, ms.float32)
                done = chained_update(self.steps, chained, self.eps_value, self.decay_flags[index],
                                      self.parameters[index], self.exp_avg[index], self.exp_avg_sq[index], grad)
                continue
            if grad_scale is not None:
                grad = grad * ops.cast(grad_scale, grad.dtype)
            done = _update_one(self.fused_adamw, plain, folded, self.in_place_flags[index], self.decay_flags[index],
                               self.parameters[index], self.exp_avg[index], self.exp_avg_sq[index], grad)
        return ops.depend(step, done)

    def _chained_scalars(self, lr, grad_scale, bias_correction1, root2):
        """The [1]-shaped factors of `chained_update` for this step."""
        one_minus_beta1 = self.one - self.beta1
        k1 = one_minus_beta1 if grad_scale is None else one_minus_beta1 * ops.cast(grad_scale, ms.float32)
        k2 = (self.one - self.beta2) / (one_minus_beta1 * one_minus_beta1)
        values = (k1, k2, self.beta1, self.beta2, self.one - lr * self.weight_decay, self.one / root2,
                  -lr / bias_correction1)
        return tuple(ops.reshape(value, (1,)) for value in values)


def build_optimizer(section, params):
    from mindpretrain import registry

    section = dict(section or {"type": "AdamW"})
    if "beta1" in section or "beta2" in section:  # MindFormers' older spelling
        section["betas"] = (section.pop("beta1", 0.9), section.pop("beta2", 0.95))
    return registry.build("optimizer", section, params=params)
