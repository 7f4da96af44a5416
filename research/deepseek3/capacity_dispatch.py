"""The ``capacity`` MoE dispatch: tokens laid out per expert with a fixed capacity, experts split by ``ep``.

MindFormers' way of expert parallelism under semi-auto parallel (``mindformers/modules/transformer/moe.py``,
``MoEV2`` with ``TopkRouterV2``): the N tokens are ``dp_groups`` shards of n = N/dp tokens (the data-parallel
split). Inside a shard each (token, k) assignment gets a *slot*, its position among the shard's assignments to
that expert, counted k-major: every token's first choice before any second choice, token order within one k
(MindFormers' default order, ``_maskout_overflowed_tokens_sort_kdrop``; ``enable_sdrop`` is the token-major
alternative). Slots at or past the capacity ``C = ceil(K * n * capacity_factor / E)`` are dropped: the
assignment contributes nothing (MindFormers' semantics; the token keeps its other experts and the shared one).

The layout is ``[dp, E, C, H]``, transposed to ``[E, dp*C, H]`` for three batch matmuls with the stacked
expert weights ``[E, out, in]``. Their shard strategies split E by ``ep`` (and the rows by ``dp_ep``), while
the token side is split by ``dp``: the two transposes are where MindSpore inserts the AlltoAll between the
layouts. Dispatch and combine are one-hot masks ``[dp, n, E, C]`` applied by batch matmuls, so every primitive
has a plain strategy (kinds ``moe.capacity_*`` in research/deepseek3/sharding.py). The masks cost n*E*C
elements each per shard and layer (`capacity_footprint`) and as many multiply-adds per hidden unit: fine for
small n*E, too much at DeepSeek-V3 scale, where MindFormers gathers by index ([dp, E, C] token indices,
``Gather(batch_dims=1)``) instead. With this dispatch the model stores the routed experts stacked, one
[E, out, in] Parameter per projection (`moe.StackedRoutedExperts`), read through Casts split (ep, emp) like the
matmuls' weight inputs, so under semi-auto parallel a device also *stores* only E/ep experts; checkpoints keep the
HF per-expert names (tests/training/test_stacked_experts_checkpoint.py).
"""
import math

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops.auto_generate import SiLU

from mindpretrain.validation import require

DEFAULT_CAPACITY_FACTOR = 1.1      # MindFormers' MoEConfig.capacity_factor default


def tokens_per_group(tokens, dp_groups):
    """n = N / dp: the tokens of one data-parallel shard. The batch is split by dp (a global batch of
    batch_size x dp under semi-auto parallel), so a remainder is a wiring bug: ValueError, which GRAPH mode can
    raise while compiling (it refuses other exception types)."""
    if tokens % dp_groups != 0:
        raise ValueError(f"tokens of the MoE layer ({tokens}) must be a multiple of the data-parallel shards "
                         f"({dp_groups})")
    return tokens // dp_groups


def expert_capacity(shard_tokens, top_k, num_experts, capacity_factor):
    """Slots per expert and shard: ``ceil(K * n * capacity_factor / E)`` in MindFormers' operand order, at least
    1 and at most n (an expert receives a token at most once, so more slots would stay empty; MindFormers'
    ``calculate_expert_capacity_v2`` caps it the same way)."""
    capacity = math.ceil(top_k * shard_tokens * capacity_factor / num_experts)
    return max(1, min(capacity, shard_tokens))


def capacity_footprint(shard_tokens, top_k, num_experts, capacity_factor, hidden_size):
    """Static sizes of one MoE layer's capacity dispatch per data-parallel shard (for memory planning): the
    capacity, the elements of each of the two masks [n, E, C] (dispatch, combine; both kept for backward), of
    the k-major assignment one-hot [K*n, E] (transient) and of the expert input rows [E, C, H]."""
    capacity = expert_capacity(shard_tokens, top_k, num_experts, capacity_factor)
    return dict(capacity=capacity, mask_elements=shard_tokens * num_experts * capacity,
                assignment_onehot_elements=top_k * shard_tokens * num_experts,
                expert_input_elements=num_experts * capacity * hidden_size,
                expert_rows=num_experts * capacity, routed_rows=top_k * shard_tokens)


class CapacityExperts(nn.Cell):
    """Routed compute of the ``capacity`` dispatch: ``construct(x [N, H], topk_idx int32 [N, K], topk_weight
    [N, K], gate/up weights [E, I, H], down weights [E, H, I]) -> [N, H]``, the router-weighted sum of each
    token's kept assignments (combine included: dropped assignments need the slots the combine reads).

    ``dp_groups`` is the data-parallel degree the token dimension is split by (1 stand-alone; set it with
    `set_dp_groups` before compiling under semi-auto parallel); N must be a multiple of it.
    """

    def __init__(self, num_experts, top_k, capacity_factor, compute_dtype, dp_groups=1):
        super().__init__()
        require(isinstance(capacity_factor, (int, float)) and capacity_factor > 0, "moe_capacity_factor",
                capacity_factor, "must be a number > 0")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = float(capacity_factor)
        self.compute_dtype = compute_dtype
        self.dp_groups = int(dp_groups)
        self._declare_slot_primitives()
        self._declare_mask_primitives()
        self._declare_expert_primitives()

    def _declare_slot_primitives(self):
        self.to_k_major = ops.Transpose()                          # [dp, n, K] -> [dp, K, n]
        self.to_token_major = ops.Transpose()                      # [dp, K, n] -> [dp, n, K]
        self.assignment_onehot = ops.OneHot()                      # [dp, K*n] -> [dp, K*n, E]
        self.slot_cumsum = ops.CumSum(exclusive=True)              # assignments before, per expert
        self.slot_mul = ops.Mul()
        self.slot_sum = ops.ReduceSum(keep_dims=False)
        self.keep_less = ops.Less()                                # slot < C
        self.shard_ops = {"to_k_major": "moe.capacity_k_major", "to_token_major": "moe.capacity_k_major",
                          "assignment_onehot": "moe.capacity_assignment_onehot",
                          "slot_cumsum": "moe.capacity_slot_cumsum", "slot_mul": "moe.capacity_slot_mul",
                          "slot_sum": "moe.capacity_slot_sum", "keep_less": "moe.capacity_keep_less"}

    def _declare_mask_primitives(self):
        self.expert_onehot = ops.OneHot()                          # [dp, n, K] -> [dp, n, K, E]
        self.slot_onehot = ops.OneHot()                            # [dp, n, K] -> [dp, n, K, C]
        self.keep_mul = ops.Mul()
        self.weight_mul = ops.Mul()
        self.dispatch_mask_matmul = ops.BatchMatMul(transpose_a=True)   # sum_k e_k^T c_k: [dp, n, E, C]
        self.combine_mask_matmul = ops.BatchMatMul(transpose_a=True)
        self.dispatch_matmul = ops.BatchMatMul(transpose_a=True)   # mask^T x: [dp, E*C, H]
        self.combine_matmul = ops.BatchMatMul()                    # mask y: [dp, n, H]
        self.shard_ops.update({"expert_onehot": "moe.capacity_expert_onehot",
                               "slot_onehot": "moe.capacity_slot_onehot", "keep_mul": "moe.capacity_keep_mul",
                               "weight_mul": "moe.capacity_weight_mul",
                               "dispatch_mask_matmul": "moe.capacity_mask_matmul",
                               "combine_mask_matmul": "moe.capacity_mask_matmul",
                               "dispatch_matmul": "moe.capacity_dispatch", "combine_matmul": "moe.capacity_combine"})

    def _declare_expert_primitives(self):
        self.to_experts = ops.Transpose()                          # [dp, E, C, H] -> [E, dp, C, H]
        self.from_experts = ops.Transpose()                        # [E, dp, C, H] -> [dp, E, C, H]
        self.gate_matmul = ops.BatchMatMul(transpose_b=True)       # [E, dp*C, H] x [E, I, H]^T
        self.up_matmul = ops.BatchMatMul(transpose_b=True)
        self.down_matmul = ops.BatchMatMul(transpose_b=True)       # [E, dp*C, I] x [E, H, I]^T
        self.silu = SiLU()
        self.swiglu_mul = ops.Mul()
        self.shard_ops.update({"to_experts": "moe.capacity_to_experts", "from_experts": "moe.capacity_from_experts",
                               "gate_matmul": "moe.capacity_gate_proj", "up_matmul": "moe.capacity_up_proj",
                               "down_matmul": "moe.capacity_down_proj", "silu": "moe.capacity_silu",
                               "swiglu_mul": "moe.capacity_swiglu_mul"})

    def construct(self, x, topk_idx, topk_weight, gate_weights, up_weights, down_weights):
        tokens, hidden = x.shape
        groups = self.dp_groups
        per_group = tokens_per_group(tokens, groups)
        capacity = expert_capacity(per_group, self.top_k, self.num_experts, self.capacity_factor)
        slots = self.slots(topk_idx.reshape(groups, per_group, self.top_k))
        dispatch, combine = self.masks(topk_idx.reshape(groups, per_group, self.top_k), slots,
                                       topk_weight.reshape(groups, per_group, self.top_k), capacity)
        rows = self.num_experts * capacity
        x_groups = ops.cast(x, self.compute_dtype).reshape(groups, per_group, hidden)
        expert_in = self.dispatch_matmul(dispatch.reshape(groups, per_group, rows), x_groups)   # [dp, E*C, H]
        expert_in = self.to_experts(expert_in.reshape(groups, self.num_experts, capacity, hidden), (1, 0, 2, 3))
        expert_in = expert_in.reshape(self.num_experts, groups * capacity, hidden)
        gate = self.silu(self.gate_matmul(expert_in, gate_weights))
        y = self.down_matmul(self.swiglu_mul(gate, self.up_matmul(expert_in, up_weights)), down_weights)
        y = self.from_experts(y.reshape(self.num_experts, groups, capacity, hidden), (1, 0, 2, 3))
        out = self.combine_matmul(combine.reshape(groups, per_group, rows), y.reshape(groups, rows, hidden))
        return out.reshape(tokens, hidden)

    def slots(self, topk_idx):
        """topk_idx int32 [dp, n, K] -> int32 [dp, n, K]: each assignment's position among its shard's assignments
        to the same expert, k-major (all first choices, then all second choices, ...; token order within)."""
        groups, per_group, top_k = topk_idx.shape
        k_major = self.to_k_major(topk_idx, (0, 2, 1)).reshape(groups, top_k * per_group)
        chosen = self.assignment_onehot(k_major, self.num_experts, Tensor(1.0, ms.float32),
                                        Tensor(0.0, ms.float32))                          # [dp, K*n, E]
        before = self.slot_cumsum(chosen, 1)
        slot = self.slot_sum(self.slot_mul(before, chosen), -1).reshape(groups, top_k, per_group)
        return ops.stop_gradient(ops.cast(self.to_token_major(slot, (0, 2, 1)), ms.int32))

    def masks(self, topk_idx, slots, topk_weight, capacity):
        """-> (dispatch, combine) [dp, n, E, C] in the compute dtype: 1 (the router weight) where token t of a
        shard holds slot c of expert e; an assignment with slot >= C appears in neither."""
        on, off = Tensor(1.0, self.compute_dtype), Tensor(0.0, self.compute_dtype)
        kept = ops.cast(self.keep_less(slots, capacity), self.compute_dtype)
        slot_onehot = self.keep_mul(self.slot_onehot(slots, capacity, on, off), ops.expand_dims(kept, -1))
        expert_onehot = self.expert_onehot(topk_idx, self.num_experts, on, off)              # [dp, n, K, E]
        slot_onehot, expert_onehot = ops.stop_gradient(slot_onehot), ops.stop_gradient(expert_onehot)
        dispatch = self.dispatch_mask_matmul(expert_onehot, slot_onehot)
        weight = ops.expand_dims(ops.cast(topk_weight, self.compute_dtype), -1)             # [dp, n, K, 1]
        combine = self.combine_mask_matmul(expert_onehot, self.weight_mul(slot_onehot, weight))
        return ops.stop_gradient(dispatch), combine


def set_dp_groups(model, dp_groups):
    """Tell every `CapacityExperts` of `model` how many data-parallel shards split the tokens (the capacity and
    the slots are per shard, as in MindFormers). Call it before the first compiled step; returns the count."""
    require(isinstance(dp_groups, int) and dp_groups >= 1, "parallel_config.data_parallel", dp_groups,
            "must be a positive integer")
    cells = [cell for _, cell in model.cells_and_names() if isinstance(cell, CapacityExperts)]
    for cell in cells:
        cell.dp_groups = dp_groups
    return len(cells)
