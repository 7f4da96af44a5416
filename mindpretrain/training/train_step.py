"""The compiled parts of one training step: forward+backward (with accumulation and DP averaging)
and the clipped optimizer update.

They are two Cells, not one, because the decision between them is made in Python: the trainer
looks at the (rank-averaged) loss and gradient norm, and applies the update only when both are
finite. Every rank sees the same averaged numbers, so every rank makes the same decision and the
parameters stay identical across data-parallel ranks. GradOperation lives inside a Cell (as in
`nn.TrainOneStepCell`), which compiles in GRAPH mode; the micro-batch loop is unrolled at compile
time (gradient_accumulation_steps is static).

Model contract: `network(input_ids, labels, loss_mask, *extra)` returns
`(loss, lm_loss, mtp_loss, balance_loss, expert_load)`; only `loss` is differentiated, and
`expert_load` ([num_moe_layers, n_routed_experts], tokens routed per expert) is summed over micro
batches and ranks, ready for the aux-loss-free bias update. `extra` are further batch columns passed
through unchanged (packed SFT rows: `position_ids, actual_seq_len`; none for pretraining).

Per-token loss (`per_token_loss=True`, MindFormers' `calculate_per_token_loss`): the model sums its
cross-entropy instead of averaging it (`set_loss_reduction("sum")`), and the loss mask it gets is
divided by the number of target tokens of the whole global batch (all micro batches, all ranks)
times the micro-batch x rank count that the averaging below undoes. The step's loss is then
sum(CE) / sum(targets) over the global batch, so accumulation and data parallelism weight every
target token alike instead of every micro batch alike.

The losses vector ends with the global number of target tokens (the loss mask's sum), for the log.

Loss scaling (float16 compute, `mindpretrain.training.loss_scale`): with `loss_scaling=True` the
differentiated output is `loss * loss_scale` and the gradients are multiplied by
`1 / (micro batches x ranks x loss_scale)` before the norm, so the norm, clipping and update see
unscaled gradients; an overflow shows as a non-finite norm. Without it the graph is the one
without any scale at all (bfloat16/float32 runs are bit-for-bit what they were).
"""
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.parallel.nn import Pipeline, PipelineGradReducer

from mindpretrain.utils.logging import get_logger

logger = get_logger("train_step")

_square_sum = ops.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_one(grad):
    """sum(g * g) as a dot product: a MatMul takes no gradient-sized temporary, where `g * g` took one from the
    memory pool for every gradient (measured: -509 MiB peak for a 1.46 GiB model whose largest gradient is
    505 MiB)."""
    if grad.dtype != ms.float32:
        grad = ops.cast(grad, ms.float32)
    return ops.matmul(grad.reshape(1, -1), grad.reshape(-1, 1)).reshape(())


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


_all_reduce_shared = ops.MultitypeFuncGraph("all_reduce_shared")


@_all_reduce_shared.register("Function", "Bool", "Tensor")
def _all_reduce_unless_local(all_reduce, local, tensor):
    """Sum over the ranks unless the parameter lives on this rank only (a partitioned expert's slice)."""
    if local:
        return tensor
    return all_reduce(tensor)


class ScaledLossCell(nn.Cell):
    """The model with its differentiated output multiplied by `loss_scale` (the unscaled loss and
    the other outputs follow as auxiliary outputs, which value_and_grad does not differentiate)."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, input_ids, labels, loss_mask, loss_scale, *extra):
        loss, lm_loss, mtp_loss, balance_loss, expert_load = self.network(input_ids, labels, loss_mask, *extra)
        return loss * ops.cast(loss_scale, loss.dtype), loss, lm_loss, mtp_loss, balance_loss, expert_load


class ForwardBackwardCell(nn.Cell):
    """`(input_ids, labels, loss_mask)` of shape [A, B, S] (A micro batches), this rank's
    `stop_flag` (1.0 after SIGTERM), the `loss_scale` (float32 scalar, ignored unless
    `loss_scaling`) and any further columns [A, B, S] -> `(losses, expert_load, grad_norm, grads)`,
    where losses = [loss, lm_loss, mtp_loss, balance_loss, stop, target_tokens]: the first four
    averaged over the A micro batches and the `dp_size` ranks, stop > 0 when any rank wants to stop,
    target_tokens the global loss-mask sum; expert_load is summed, and the gradients are averaged."""

    def __init__(self, network, weights, accumulation_steps=1, dp_size=1, loss_scaling=False,
                 per_token_loss=False, local_weights=None):
        super().__init__(auto_prefix=False)
        # expert parallelism (expert_parallel == dp): flags of the weights this rank alone holds; their gradient
        # already sums every rank's tokens (research/deepseek3/expert_parallel.py), so it is not all-reduced,
        # and its share of the squared norm is summed over the ranks instead
        self.local_flags = tuple(bool(flag) for flag in local_weights) if local_weights is not None else None
        if self.local_flags is not None and not any(self.local_flags):
            self.local_flags = None
        self.local_mask = (Tensor([1.0 if flag else 0.0 for flag in self.local_flags], ms.float32)
                           if self.local_flags is not None else None)
        self.loss_scaling = bool(loss_scaling)
        self.per_token_loss = bool(per_token_loss)
        self.network = ScaledLossCell(network) if self.loss_scaling else network
        self.weights = ms.ParameterTuple(weights)
        self.accumulation_steps = int(accumulation_steps)
        self.dp_size = int(dp_size)
        # has_aux: only the first output (the loss) is differentiated; the forward runs once.
        self.value_and_grad = ops.value_and_grad(self.network, None, self.weights, has_aux=True)
        self.hyper_map = ops.HyperMap()
        self.all_reduce = ops.AllReduce() if self.dp_size > 1 else None
        # averages the gradients, the losses and the stop flag; the target count stays a sum
        self.average = Tensor(1.0 / (self.accumulation_steps * self.dp_size), ms.float32)

    def _micro_step(self, input_ids, labels, loss_mask, loss_scale, extra):
        if self.loss_scaling:
            outputs, grads = self.value_and_grad(input_ids, labels, loss_mask, loss_scale, *extra)
            _, loss, lm_loss, mtp_loss, balance_loss, expert_load = outputs
        else:
            outputs, grads = self.value_and_grad(input_ids, labels, loss_mask, *extra)
            loss, lm_loss, mtp_loss, balance_loss, expert_load = outputs
        return loss, lm_loss, mtp_loss, balance_loss, expert_load, grads

    def _global_targets(self, loss_mask):
        """The loss-mask sum of the whole global batch (every micro batch, every rank)."""
        targets = ops.cast(loss_mask, ms.float32).sum()
        return self.all_reduce(targets) if self.dp_size > 1 else targets

    def construct(self, input_ids, labels, loss_mask, stop_flag, loss_scale, *extra):
        targets = self._global_targets(loss_mask)
        if self.per_token_loss:
            # x (A * dp), undone by the averaging below: sum(CE) / targets over the global batch
            weight = (1.0 / self.average) / ops.maximum(targets, 1.0)
            loss_mask = ops.cast(loss_mask, ms.float32) * weight
        micro = tuple(column[0] for column in extra)
        loss, lm_loss, mtp_loss, balance_loss, expert_load, grads = self._micro_step(
            input_ids[0], labels[0], loss_mask[0], loss_scale, micro)
        for index in range(1, self.accumulation_steps):
            micro = tuple(column[index] for column in extra)
            more = self._micro_step(input_ids[index], labels[index], loss_mask[index], loss_scale, micro)
            loss = loss + more[0]
            lm_loss = lm_loss + more[1]
            mtp_loss = mtp_loss + more[2]
            balance_loss = balance_loss + more[3]
            expert_load = expert_load + more[4]
            grads = self.hyper_map(_add, grads, more[5])
        stop = stop_flag * self.accumulation_steps
        # each output may be a scalar or a vector of metrics (the GRPO loss reports several in its 4th output)
        losses = ops.concat(tuple(ops.reshape(value.astype(ms.float32), (-1,))
                                  for value in (loss, lm_loss, mtp_loss, balance_loss, stop)))
        expert_load = expert_load.astype(ms.float32)
        if self.dp_size > 1 and self.local_flags is not None:
            grads = self.hyper_map(ops.partial(_all_reduce_shared, self.all_reduce), self.local_flags, grads)
        elif self.dp_size > 1:
            grads = self.hyper_map(ops.partial(_all_reduce_sum, self.all_reduce), grads)
        if self.dp_size > 1:
            losses = self.all_reduce(losses)
            expert_load = self.all_reduce(expert_load)
        if self.loss_scaling:
            grads = self.hyper_map(ops.partial(_scale, self.average / loss_scale), grads)
        elif self.accumulation_steps * self.dp_size > 1:      # x 1.0 would only copy every gradient
            grads = self.hyper_map(ops.partial(_scale, self.average), grads)
        losses = ops.concat((losses * self.average, targets.reshape(1)))
        if self.local_flags is not None and self.dp_size > 1:
            return losses, expert_load, self._partitioned_norm(grads), grads
        grad_norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        return losses, expert_load, grad_norm, grads

    def _partitioned_norm(self, grads):
        """Global norm when some gradients live on one rank each: shared squares once, local squares summed."""
        squares = ops.stack(self.hyper_map(_square_sum, grads))
        local = (squares * self.local_mask).sum()
        return ops.sqrt((squares * (1.0 - self.local_mask)).sum() + self.all_reduce(local))


# MindSpore's graph evaluator recurses along the optimizer's chain of per-parameter updates (each ordered after
# the previous one, so one update's temporaries are freed before the next): measured, 202 parameters (the tiny
# model with 16 experts) exceed the default max_call_depth of 1000 and 130 do not.
CALL_DEPTH_PER_PARAMETER = 6
CALL_DEPTH_MARGIN = 500


def ensure_call_depth(num_parameters):
    """Raise MindSpore's max_call_depth to what an update over `num_parameters` needs (never lower it; MindFormers'
    YAMLs set 10000 themselves). Returns the depth in force."""
    needed = CALL_DEPTH_PER_PARAMETER * int(num_parameters) + CALL_DEPTH_MARGIN
    current = int(ms.get_context("max_call_depth"))
    if current < needed:
        ms.set_context(max_call_depth=needed)
        logger.info("max_call_depth %d -> %d for the update of %d parameters", current, needed, num_parameters)
        return needed
    return current


class ApplyUpdateCell(nn.Cell):
    """`(grads, lr, clip_factor)` -> the optimizer's update with the gradients scaled by `clip_factor`
    (global-norm clipping, computed by the caller from the norm it already has). The optimizer applies the
    factor parameter by parameter, inside its update: scaling all gradients first would hold a second full
    copy of them (4.8 GiB for the 1B model)."""

    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        ensure_call_depth(len(optimizer.parameters))

    def construct(self, grads, lr, clip_factor):
        return self.optimizer(grads, lr, clip_factor)


class UpdateStep:
    """The whole optimizer step: the compiled `ApplyUpdateCell`, then the optimizer's host update of the
    parameters it keeps out of the graph (`AdamW.host_update`: on CPU, all of them, and then no cell is
    compiled at all)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        enable = getattr(optimizer, "enable_host_update", None)
        self.host_update = optimizer.host_update if enable is not None and enable() else None
        self.cell = None if getattr(optimizer, "host_only", False) else ApplyUpdateCell(optimizer)

    def __call__(self, grads, lr, clip_factor):
        if self.cell is not None:
            self.cell(ms.mutable(tuple(grads)), lr, clip_factor)
        if self.host_update is not None:
            self.host_update(grads, lr, clip_factor)


def clip_factor(grad_norm, max_grad_norm):
    """Megatron's global-norm clipping coefficient: 1 when within bounds or clipping is off."""
    if not max_grad_norm or max_grad_norm <= 0:
        return 1.0
    return min(1.0, float(max_grad_norm) / (float(grad_norm) + 1e-6))


class PackedOutputCell(nn.Cell):
    """The model's five outputs as one float32 vector `[loss, lm_loss, mtp_loss, balance_loss,
    expert_load...]`, because MindSpore's Pipeline cell sums exactly one output over the micro
    batches (its `pipeline_end` Add). The sens vector of the backward selects the first entry, so
    only the loss is differentiated; the expert load is summed over micro batches, as wanted."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, input_ids, labels, loss_mask, *extra):
        loss, lm_loss, mtp_loss, balance_loss, expert_load = self.network(input_ids, labels, loss_mask, *extra)
        losses = ops.stack((loss, lm_loss, mtp_loss, balance_loss)).astype(ms.float32)
        return ops.concat((losses, ops.stop_gradient(expert_load.astype(ms.float32).reshape(-1))))


class PipelineForwardBackwardCell(nn.Cell):
    """Forward/backward for Ascend pipeline parallelism (semi-auto, `pipeline_stage > 1`), with the
    interface of ForwardBackwardCell: `(input_ids, labels, loss_mask)` of shape [1, N, S] (N = the
    global batch, `full_batch`), `stop_flag`, `loss_scale` -> `(losses, expert_load, grad_norm, grads)`.

    MindSpore 2.10's functional pipeline recipe: `mindspore.parallel.nn.Pipeline(network, micro_size)`
    slices the batch into `micro_batch_num` micro batches and sums the outputs
    (mindspore/parallel/nn/parallel_cell_wrapper.py, classes PipelineCell and Pipeline; the older
    `mindspore.nn.PipelineCell` is marked for deprecation in favour of it), the gradient is taken of
    that cell, and `mindspore.parallel.nn.PipelineGradReducer` returns the micro-batch-accumulated
    gradients that the pipeline pass collected in its `accu_grads` buffers and zeroes them
    (mindspore/parallel/nn/parallel_grad_reducer.py, class PipelineGradReducer). The loss scale
    enters as the sens of the backward (as MindFormers' MFPipelineWithLossScaleCell does), and the
    sum over micro batches is turned into a mean here. MindSpore inserts the data-parallel gradient
    reduction itself in semi-auto mode, so none is added.

    `grad_reducer=False` leaves the reducer out: stand-alone (CPU tests) has no pipeline pass to
    fill `accu_grads`, and the gradients of the summed micro batches are then the direct ones.
    """

    def __init__(self, network, weights, micro_batch_num, load_shape, optimizer_shard=False, grad_reducer=True,
                 per_token_loss=False):
        super().__init__(auto_prefix=False)
        self.per_token_loss = bool(per_token_loss)
        self.weights = ms.ParameterTuple(weights)
        self.micro_batch_num = int(micro_batch_num)
        self.pipeline = Pipeline(PackedOutputCell(network), self.micro_batch_num)
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.grad_reducer = (PipelineGradReducer(self.weights, scale_sense=1.0, opt_shard=bool(optimizer_shard))
                             if grad_reducer else None)
        self.load_shape = tuple(int(size) for size in load_shape)
        self.average = Tensor(1.0 / self.micro_batch_num, ms.float32)
        self.hyper_map = ops.HyperMap()

    def construct(self, input_ids, labels, loss_mask, stop_flag, loss_scale, *extra):
        input_ids, labels, loss_mask = input_ids[0], labels[0], loss_mask[0]
        extra = tuple(column[0] for column in extra)
        targets = ops.cast(loss_mask, ms.float32).sum()      # the global batch: full_batch
        if self.per_token_loss:
            loss_mask = ops.cast(loss_mask, ms.float32) * (self.micro_batch_num / ops.maximum(targets, 1.0))
        packed = self.pipeline(input_ids, labels, loss_mask, *extra)
        sens = ops.concat((ops.reshape(loss_scale.astype(ms.float32), (1,)),
                           ops.zeros((packed.shape[0] - 1,), ms.float32)))
        grads = self.grad(self.pipeline, self.weights)(input_ids, labels, loss_mask, *extra, sens)
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        grads = self.hyper_map(ops.partial(_scale, self.average / loss_scale), grads)
        losses = ops.concat((packed[:4] * self.average, ops.reshape(stop_flag, (1,)), targets.reshape(1)))
        expert_load = ops.reshape(packed[4:], self.load_shape)
        grad_norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        return losses, expert_load, grad_norm, grads


def expert_load_shape(model):
    """[num_moe_layers, n_routed_experts] from the model's expert biases (one per MoE layer)."""
    biases = list(model.moe_layer_biases()) if hasattr(model, "moe_layer_biases") else []
    return (len(biases), int(biases[0].shape[0])) if biases else (0, 0)
