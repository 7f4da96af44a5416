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
once taken, is what later graphs reuse and touch: a compiled update of a 1.46 GiB model held three copies of
its parameters' outputs in the pool. So on CPU the trainer's update (train_step.UpdateStep,
`enable_host_update`) leaves every float32 parameter out of the compiled update and gives it the host update
instead (`host_update`, host_adamw.py): the same formula in one fused float32 loop, in
place on the parameter's host memory, with no temporary (measured in docs/planner.md). The fused kernel
remains the update on Ascend, where parameters live in device memory.

State lives in Parameters named `exp_avg.<param>`, `exp_avg_sq.<param>` and `adam_step`, so a
checkpoint stores it under readable names and restores it bit-exactly. The moments are float32
whatever the parameter dtype (the parameters themselves are the fp32 master weights; the model
casts to its compute dtype inside). Weight decay applies to matrices only (ndim >= 2): norms and
biases are not decayed, as in Megatron's default parameter groups. The fused kernel needs var, m
and v of one dtype, so a parameter that is not float32 (a warned-about configuration) takes the
same formula as tensor arithmetic instead, with its temporaries.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindpretrain.training import host_adamw
from mindpretrain.validation import require
from mindpretrain.registry import register


# On CPU, float32 parameters of at least this many elements are updated on the host (`AdamW.host_update`)
# instead of by the compiled update: all of them (tests raise it to check a mixed update).
HOST_UPDATE_MIN_ELEMENTS = 0


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
        self.host_flags = (False,) * len(params)          # `enable_host_update` (the trainer's UpdateStep)
        self.hyper = (float(betas[0]), float(betas[1]), float(eps), float(weight_decay))
        self.beta1 = Tensor(float(betas[0]), ms.float32)
        self.beta2 = Tensor(float(betas[1]), ms.float32)
        self.eps = Tensor(float(eps), ms.float32)
        self.weight_decay = Tensor(float(weight_decay), ms.float32)
        self.one = Tensor(1.0, ms.float32)
        self.zero = Tensor(0.0, ms.float32)
        self.fused_adamw = ops.AdamWeightDecay()

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
        done = step
        for index in range(len(self.parameters)):
            if self.host_flags[index]:                 # `host_update`, after this graph
                continue
            grad = ops.depend(grads[index], done)
            if grad_scale is not None:
                grad = grad * ops.cast(grad_scale, grad.dtype)
            done = _update_one(self.fused_adamw, plain, folded, self.in_place_flags[index], self.decay_flags[index],
                               self.parameters[index], self.exp_avg[index], self.exp_avg_sq[index], grad)
        return ops.depend(step, done)

    def enable_host_update(self):
        """On CPU (where a parameter's memory is host memory NumPy can view), move every float32 parameter of
        HOST_UPDATE_MIN_ELEMENTS or more out of the compiled update into `host_update`. Called before the update
        compiles, by whoever then calls `host_update` after each compiled update (train_step.UpdateStep).
        Returns whether any parameter moved."""
        if str(ms.get_context("device_target")).upper() == "CPU":
            self.host_flags = tuple(flag and math.prod(param.shape) >= HOST_UPDATE_MIN_ELEMENTS
                                    for flag, param in zip(self.in_place_flags, self.parameters))
        return any(self.host_flags)

    @property
    def host_only(self):
        """Every parameter takes the host update: the compiled update would only count the step."""
        return all(self.host_flags)

    def host_update(self, grads, lr, grad_scale=1.0):
        """The step of the host-updated parameters (`host_flags`): after `construct`, which counted the step, or
        alone when `host_only` (then it counts the step itself). `grads` the same tuple, `lr` and `grad_scale`
        floats or scalar tensors."""
        if not any(self.host_flags):
            return
        beta1, beta2, eps, weight_decay = self.hyper
        if self.host_only:
            host_adamw.host_view(self.adam_step, "adam_step")[0] += np.float32(1.0)
        step = float(self.adam_step.asnumpy().reshape(-1)[0])
        one = np.float32(1.0)
        bc1 = one - np.float32(beta1) ** np.float32(step)
        bc2 = one - np.float32(beta2) ** np.float32(step)
        lr, scale = float(np.asarray(_number(lr))), float(np.asarray(_number(grad_scale)))
        scalars = (scale, beta1, beta2, lr, np.float32(lr) * np.float32(weight_decay), bc1, bc2, eps)
        for index, on_host in enumerate(self.host_flags):
            if on_host:
                param = self.parameters[index]
                host_adamw.adamw_step(host_adamw.host_view(param, "parameter"),
                                      host_adamw.host_view(self.exp_avg[index], "exp_avg"),
                                      host_adamw.host_view(self.exp_avg_sq[index], "exp_avg_sq"),
                                      host_adamw.host_view(grads[index], "gradient"), scalars,
                                      self.decay_flags[index])


def _number(value):
    """A float from a Python number or a scalar tensor."""
    return value.asnumpy() if hasattr(value, "asnumpy") else value


def build_optimizer(section, params):
    from mindpretrain import registry

    section = dict(section or {"type": "AdamW"})
    if "beta1" in section or "beta2" in section:  # MindFormers' older spelling
        section["betas"] = (section.pop("beta1", 0.9), section.pop("beta2", 0.95))
    return registry.build("optimizer", section, params=params)
