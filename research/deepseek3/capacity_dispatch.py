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
layouts. Dispatch and combine go by index, as MindFormers does at scale, never through [n, E, C] masks:

- ``slot_token`` int32 [dp, E*C]: the token (0..n-1) in each slot, n when the slot stays empty; a scatter of
  the kept assignments' token ids into their slots of [dp, E*C + 1] (dropped ones go to the last, spill, slot,
  which is sliced off);
- dispatch: ``Gather(batch_dims=1)`` of [x | zero row] [dp, n+1, H] by ``slot_token`` -> [dp, E*C, H];
- combine: each (token, k) gathers its slot's output from [y | zero row] [dp, E*C+1, H] by ``combine_index``
  int32 [dp, n*K] (E*C, the zero row, when dropped), times the router weight, summed over K.

Largest buffers per shard and layer (`capacity_footprint`): the k-major assignment one-hot [K*n, E] fp32 and
its cumsum (transient, no gradient), the expert rows [E*C, H] and the gathered outputs [n*K, H] (kept for
backward), the two index tensors (E*C + n*K int32, kept). At DeepSeek-V3 671B (n 4096, K 8, E 256, cf 1.5,
C 192, H 7168): one-hot 8.4M elements (32 MiB fp32), expert rows 49152 x 7168 (672 MiB bf16), gathered outputs
32768 x 7168 (448 MiB bf16), indices 81920 int32 (320 KiB); the masks this replaces were 201M elements each.
Every primitive has a plain strategy (kinds ``moe.capacity_*`` in research/deepseek3/sharding.py). With this
dispatch the model stores the routed experts stacked, one [E, out, in] Parameter per projection
(`moe.StackedRoutedExperts`), read through Casts split (ep, emp) like the matmuls' weight inputs, so under
semi-auto parallel a device also *stores* only E/ep experts; checkpoints keep the HF per-expert names
(tests/training/test_stacked_experts_checkpoint.py).
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
    capacity; kept for backward: the int32 indices (``slot_token`` [E*C], ``combine_index`` [n*K]), the expert
    input rows [E*C, H] and the gathered expert outputs [n*K, H]; transient: the k-major assignment one-hot
    [K*n, E]."""
    capacity = expert_capacity(shard_tokens, top_k, num_experts, capacity_factor)
    rows, routed = num_experts * capacity, top_k * shard_tokens
    return dict(capacity=capacity, slot_token_elements=rows, combine_index_elements=routed,
                index_elements=rows + routed, assignment_onehot_elements=top_k * shard_tokens * num_experts,
                expert_input_elements=rows * hidden_size, gathered_output_elements=routed * hidden_size,
                expert_rows=rows, routed_rows=routed)


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
        self._declare_index_primitives()
        self._declare_gather_primitives()
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

    def _declare_index_primitives(self):
        self.expert_offset_mul = ops.Mul()                         # expert * C: its first slot in [E*C]
        self.slot_position_add = ops.Add()                         # + slot
        self.spill_select = ops.Select()                           # dropped -> E*C (spill slot / zero row)
        self.token_ones = ops.OnesLike()                           # [dp, n, K]
        self.token_cumsum = ops.CumSum(exclusive=True)             # along n: each assignment's token id
        self.slot_scatter = ops.TensorScatterElements(axis=1)      # token ids into [dp, E*C + 1]
        self.slot_slice = ops.StridedSlice()                       # drop the spill slot -> [dp, E*C]
        self.shard_ops.update({"expert_offset_mul": "moe.capacity_expert_offset",
                               "slot_position_add": "moe.capacity_slot_position",
                               "spill_select": "moe.capacity_spill_select", "token_ones": "moe.capacity_token_ids",
                               "token_cumsum": "moe.capacity_token_ids", "slot_scatter": "moe.capacity_slot_scatter",
                               "slot_slice": "moe.capacity_slot_slice"})

    def _declare_gather_primitives(self):
        self.token_zero_row = ops.Concat(axis=1)                   # [x | 0]: [dp, n + 1, H]
        self.slot_zero_row = ops.Concat(axis=1)                    # [y | 0]: [dp, E*C + 1, H]
        self.dispatch_gather = ops.Gather(batch_dims=1)            # [dp, n+1, H] by [dp, E*C] -> [dp, E*C, H]
        self.combine_gather = ops.Gather(batch_dims=1)             # [dp, E*C+1, H] by [dp, n*K] -> [dp, n*K, H]
        self.weight_mul = ops.Mul()                                # [dp, n, K, H] * [dp, n, K, 1]
        self.combine_sum = ops.ReduceSum(keep_dims=False)          # over K -> [dp, n, H]
        self.shard_ops.update({"token_zero_row": "moe.capacity_zero_row", "slot_zero_row": "moe.capacity_zero_row",
                               "dispatch_gather": "moe.capacity_dispatch", "combine_gather": "moe.capacity_combine",
                               "weight_mul": "moe.capacity_weight_mul", "combine_sum": "moe.capacity_combine_sum"})

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
        groups, experts = self.dp_groups, self.num_experts
        per_group = tokens_per_group(tokens, groups)
        capacity = expert_capacity(per_group, self.top_k, experts, self.capacity_factor)
        topk_idx = topk_idx.reshape(groups, per_group, self.top_k)
        slot_token, combine_index = self.indices(topk_idx, self.slots(topk_idx), capacity)
        x_rows = self._with_zero_row(self.token_zero_row, ops.cast(x, self.compute_dtype).reshape(
            groups, per_group, hidden))
        expert_in = self.dispatch_gather(x_rows, slot_token, 1)                                 # [dp, E*C, H]
        expert_in = self.to_experts(expert_in.reshape(groups, experts, capacity, hidden), (1, 0, 2, 3))
        expert_in = expert_in.reshape(experts, groups * capacity, hidden)
        gate = self.silu(self.gate_matmul(expert_in, gate_weights))
        y = self.down_matmul(self.swiglu_mul(gate, self.up_matmul(expert_in, up_weights)), down_weights)
        y = self.from_experts(y.reshape(experts, groups, capacity, hidden), (1, 0, 2, 3))
        y_rows = self._with_zero_row(self.slot_zero_row, y.reshape(groups, experts * capacity, hidden))
        routed = self.combine_gather(y_rows, combine_index, 1).reshape(groups, per_group, self.top_k, hidden)
        weight = ops.expand_dims(ops.cast(topk_weight, self.compute_dtype).reshape(groups, per_group, self.top_k), -1)
        out = self.combine_sum(self.weight_mul(routed, weight), 2)
        return out.reshape(tokens, hidden)

    def _with_zero_row(self, concat, rows):
        """[dp, m, H] -> [dp, m + 1, H] with a last row of zeros: where empty slots and dropped assignments read."""
        groups, _, hidden = rows.shape
        return concat((rows, ops.zeros((groups, 1, hidden), rows.dtype)))

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

    def indices(self, topk_idx, slots, capacity):
        """(slot_token int32 [dp, E*C], combine_index int32 [dp, n*K]) of topk_idx and slots [dp, n, K]:
        the token in each slot (n: empty) and each (token, k)'s slot e*C + slot (E*C: dropped, slot >= C)."""
        groups, per_group, top_k = topk_idx.shape
        rows = self.num_experts * capacity
        position = self.slot_position_add(self.expert_offset_mul(topk_idx, capacity), slots)
        combine_index = self.spill_select(self.keep_less(slots, capacity), position, ops.full_like(position, rows))
        token = self.token_cumsum(self.token_ones(topk_idx), 1)                                  # [dp, n, K]
        combine_index = combine_index.reshape(groups, per_group * top_k)
        empty = ops.full((groups, rows + 1), per_group, dtype=ms.int32)
        slot_token = self.slot_scatter(empty, combine_index, token.reshape(groups, per_group * top_k))
        slot_token = self.slot_slice(slot_token, (0, 0), (groups, rows), (1, 1))
        return ops.stop_gradient(slot_token), ops.stop_gradient(combine_index)


def set_dp_groups(model, dp_groups):
    """Tell every `CapacityExperts` of `model` how many data-parallel shards split the tokens (the capacity and
    the slots are per shard, as in MindFormers). Call it before the first compiled step; returns the count."""
    require(isinstance(dp_groups, int) and dp_groups >= 1, "parallel_config.data_parallel", dp_groups,
            "must be a positive integer")
    cells = [cell for _, cell in model.cells_and_names() if isinstance(cell, CapacityExperts)]
    for cell in cells:
        cell.dp_groups = dp_groups
    return len(cells)
