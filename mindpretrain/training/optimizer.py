"""AdamW with fp32 moments and bias correction, as a Cell so it compiles into the update graph.

Why not `nn.AdamWeightDecay`: it has no bias correction, so its first steps differ from the
AdamW that Megatron, PyTorch and MindFormers' `AdamW` apply. This one follows Loshchilov & Hutter:
decoupled weight decay `p -= lr * wd * p`, then `p -= lr * m_hat / (sqrt(v_hat) + eps)`.

State lives in Parameters named `exp_avg.<param>`, `exp_avg_sq.<param>` and `adam_step`, so a
checkpoint stores it under readable names and restores it bit-exactly. The moments are float32
whatever the parameter dtype (the parameters themselves are the fp32 master weights; the model
casts to its compute dtype inside). Weight decay applies to matrices only (ndim >= 2): norms and
biases are not decayed, as in Megatron's default parameter groups.
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindpretrain.validation import require
from mindpretrain.registry import register

_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Bool", "Tensor", "Tensor", "Tensor", "Tensor")
def _update_one(beta1, beta2, eps, lr, weight_decay, bias_correction1, bias_correction2, one,
                decay, param, exp_avg, exp_avg_sq, grad):
    grad = ops.cast(grad, ms.float32)
    param_fp32 = ops.cast(param, ms.float32)
    next_avg = beta1 * exp_avg + (one - beta1) * grad
    next_avg_sq = beta2 * exp_avg_sq + (one - beta2) * grad * grad
    if decay:
        param_fp32 = param_fp32 - lr * weight_decay * param_fp32
    denominator = ops.sqrt(next_avg_sq / bias_correction2) + eps
    param_fp32 = param_fp32 - lr * (next_avg / bias_correction1) / denominator
    ops.assign(exp_avg, next_avg)
    ops.assign(exp_avg_sq, next_avg_sq)
    ops.assign(param, ops.cast(param_fp32, param.dtype))
    return True


@register("optimizer")
class AdamW(nn.Cell):
    """`optimizer(grads, lr)` updates `params` in place; `lr` is a float32 scalar tensor."""

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
        self.beta1 = Tensor(float(betas[0]), ms.float32)
        self.beta2 = Tensor(float(betas[1]), ms.float32)
        self.eps = Tensor(float(eps), ms.float32)
        self.weight_decay = Tensor(float(weight_decay), ms.float32)
        self.one = Tensor(1.0, ms.float32)
        self.hyper_map = ops.HyperMap()

    def state_parameters(self):
        """Every state Parameter, by its checkpoint name (without the `optimizer.` prefix)."""
        state = {param.name: param for param in list(self.exp_avg) + list(self.exp_avg_sq)}
        state["adam_step"] = self.adam_step
        return state

    def construct(self, grads, lr):
        step = self.adam_step + self.one
        ops.assign(self.adam_step, step)
        bias_correction1 = self.one - ops.pow(self.beta1, step)
        bias_correction2 = self.one - ops.pow(self.beta2, step)
        update = ops.partial(_adamw_update, self.beta1, self.beta2, self.eps, lr, self.weight_decay,
                             bias_correction1, bias_correction2, self.one)
        return self.hyper_map(update, self.decay_flags, self.parameters, self.exp_avg, self.exp_avg_sq, grads)


def build_optimizer(section, params):
    from mindpretrain import registry

    section = dict(section or {"type": "AdamW"})
    if "beta1" in section or "beta2" in section:  # MindFormers' older spelling
        section["betas"] = (section.pop("beta1", 0.9), section.pop("beta2", 0.95))
    return registry.build("optimizer", section, params=params)
