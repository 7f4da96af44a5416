"""The compiled parts of one training step: forward+backward (with accumulation and DP averaging)
and the clipped optimizer update.

They are two Cells, not one, because the decision between them is made in Python: the trainer
looks at the (rank-averaged) loss and gradient norm, and applies the update only when both are
finite. Every rank sees the same averaged numbers, so every rank makes the same decision and the
parameters stay identical across data-parallel ranks. GradOperation lives inside a Cell (as in
`nn.TrainOneStepCell`), which compiles in GRAPH mode; the micro-batch loop is unrolled at compile
time (gradient_accumulation_steps is static).

Model contract: `network(input_ids, labels, loss_mask)` returns
`(loss, lm_loss, mtp_loss, balance_loss, expert_load)`; only `loss` is differentiated, and
`expert_load` ([num_moe_layers, n_routed_experts], tokens routed per expert) is summed over micro
batches and ranks, ready for the aux-loss-free bias update.
"""
import mindspore as ms
from mindspore import Tensor, nn, ops

_square_sum = ops.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_one(grad):
    grad = ops.cast(grad, ms.float32)
    return ops.reduce_sum(grad * grad)


_scale = ops.MultitypeFuncGraph("scale")


@_scale.register("Tensor", "Tensor")
def _scale_one(factor, grad):
    return grad * ops.cast(factor, grad.dtype)


_add = ops.MultitypeFuncGraph("add")


@_add.register("Tensor", "Tensor")
def _add_one(left, right):
    return left + right


_all_reduce_sum = ops.MultitypeFuncGraph("all_reduce_sum")


@_all_reduce_sum.register("Function", "Tensor")
def _all_reduce_one(all_reduce, tensor):
    return all_reduce(tensor)


class ForwardBackwardCell(nn.Cell):
    """`(input_ids, labels, loss_mask)` of shape [A, B, S] (A micro batches) and this rank's
    `stop_flag` (1.0 after SIGTERM) -> `(losses, expert_load, grad_norm, grads)`, where
    losses = [loss, lm_loss, mtp_loss, balance_loss, stop] are averaged over the A micro batches
    and the `dp_size` ranks (stop > 0 when any rank wants to stop), expert_load is summed, and the
    gradients are averaged."""

    def __init__(self, network, weights, accumulation_steps=1, dp_size=1):
        super().__init__(auto_prefix=False)
        self.network = network
        self.weights = ms.ParameterTuple(weights)
        self.accumulation_steps = int(accumulation_steps)
        self.dp_size = int(dp_size)
        # has_aux: only the first output (the loss) is differentiated; the forward runs once.
        self.value_and_grad = ops.value_and_grad(self.network, None, self.weights, has_aux=True)
        self.hyper_map = ops.HyperMap()
        self.all_reduce = ops.AllReduce() if self.dp_size > 1 else None
        self.average = Tensor(1.0 / (self.accumulation_steps * self.dp_size), ms.float32)

    def _micro_step(self, input_ids, labels, loss_mask):
        outputs, grads = self.value_and_grad(input_ids, labels, loss_mask)
        loss, lm_loss, mtp_loss, balance_loss, expert_load = outputs
        return loss, lm_loss, mtp_loss, balance_loss, expert_load, grads

    def construct(self, input_ids, labels, loss_mask, stop_flag):
        loss, lm_loss, mtp_loss, balance_loss, expert_load, grads = self._micro_step(
            input_ids[0], labels[0], loss_mask[0])
        for index in range(1, self.accumulation_steps):
            more = self._micro_step(input_ids[index], labels[index], loss_mask[index])
            loss = loss + more[0]
            lm_loss = lm_loss + more[1]
            mtp_loss = mtp_loss + more[2]
            balance_loss = balance_loss + more[3]
            expert_load = expert_load + more[4]
            grads = self.hyper_map(_add, grads, more[5])
        losses = ops.stack((loss, lm_loss, mtp_loss, balance_loss, stop_flag * self.accumulation_steps)).astype(ms.float32)
        expert_load = expert_load.astype(ms.float32)
        if self.dp_size > 1:
            grads = self.hyper_map(ops.partial(_all_reduce_sum, self.all_reduce), grads)
            losses = self.all_reduce(losses)
            expert_load = self.all_reduce(expert_load)
        grads = self.hyper_map(ops.partial(_scale, self.average), grads)
        losses = losses * self.average
        grad_norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        return losses, expert_load, grad_norm, grads


class ApplyUpdateCell(nn.Cell):
    """`(grads, lr, clip_factor)` -> scales the gradients by `clip_factor` (global-norm clipping,
    computed by the caller from the norm it already has) and runs the optimizer."""

    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, lr, clip_factor):
        grads = self.hyper_map(ops.partial(_scale, clip_factor), grads)
        return self.optimizer(grads, lr)


def clip_factor(grad_norm, max_grad_norm):
    """Megatron's global-norm clipping coefficient: 1 when within bounds or clipping is off."""
    if not max_grad_norm or max_grad_norm <= 0:
        return 1.0
    return min(1.0, float(max_grad_norm) / (float(grad_norm) + 1e-6))
