"""Token dispatchers for expert parallelism: each rank computes only its slice of the routed experts.

``allgather`` (Megatron's MoEAllGatherTokenDispatcher): gather the tokens and their routing from the
expert-parallel group, compute the local experts on every gathered token that chose one of them, sum the partial
outputs over the group and keep this rank's tokens. MindSpore's AllGather backward is a ReduceScatter, which the
CPU backend lacks, so both collectives are written as an AllReduce: the gather as the sum of zero-padded buffers
(each rank fills its own rows), the reduce-and-slice as an AllReduce then a slice. AllReduce's backward is an
AllReduce, so the expert weights' gradient on a rank is d(sum of the group's losses)/dW: every token that used
the expert contributes, which is why expert gradients skip the data-parallel AllReduce (train_step.py).

``alltoall`` (MoEAlltoAllTokenDispatcher, for Ascend): sort the token-expert assignments by destination rank
(`exchanged_experts.send_plan`, shared with the semi-auto exchanged dispatch and run on CPU there), exchange them
with per-rank counts (AlltoAllV), compute, exchange back, unpermute. The NumPy functions below state the data
movement (tested on CPU against `emulated_alltoallv`); the Cell is written for Ascend and never run here.
"""
import numpy as np

import mindspore as ms
from mindspore import nn, ops

from research.deepseek3.exchanged_experts import send_plan, weighted_sum
from research.deepseek3.moe import BlockSparseExperts, _segment_rows, _with_zero_row, default_block_size, \
    num_dispatch_blocks


class PaddedAllGather(nn.Cell):
    """x [N, ...] on each of ``world`` ranks -> [world * N, ...] in rank order, by AllReduce of a zero-padded
    buffer (differentiable on CPU: the backward is an AllReduce and a slice of it)."""

    def __init__(self, world, position, group=None):
        super().__init__()
        self.world, self.position = int(world), int(position)
        self.all_reduce = ops.AllReduce() if group is None else ops.AllReduce(group=group)

    def construct(self, x):
        rows = x.shape[0]
        before = ops.zeros((self.position * rows,) + x.shape[1:], x.dtype)
        after = ops.zeros(((self.world - 1 - self.position) * rows,) + x.shape[1:], x.dtype)
        return self.all_reduce(ops.concat((before, x, after), 0))


class LocalBlockSparseExperts(BlockSparseExperts):
    """`BlockSparseExperts` over this rank's experts only: assignments to other ranks' experts (all-zero rows of
    ``selected``) take no row; their output reads an appended zero row."""

    def construct(self, x, selected, counts, gate_weights, up_weights, down_weights):
        """x [M, H], selected int32 [M*K, E_local] -> (y_rows [rows + 1, H], row_of [M*K], last row zero)."""
        tokens = x.shape[0]
        block = self.block_size or default_block_size(tokens * self.top_k, self.num_experts)
        blocks = num_dispatch_blocks(tokens, self.top_k, self.num_experts, block)
        rows = blocks * block
        padded = (counts + (block - 1)) // block * block
        padded_end = ops.cumsum(padded, 0)
        local = selected.sum(1) > 0                                               # [M*K]
        row_of = ops.where(local, _segment_rows(selected, padded_end - padded), ops.full((selected.shape[0],), rows, dtype=ms.int32))
        row_of = ops.stop_gradient(row_of)
        source = ops.full((rows + 1,), tokens, dtype=ms.int32)
        assignment_token = ops.arange(0, row_of.shape[0], dtype=ms.int32) // self.top_k
        source = ops.stop_gradient(ops.tensor_scatter_elements(source, row_of, assignment_token, axis=0))[:rows]

        block_first_row = ops.arange(0, blocks, dtype=ms.int32).reshape(-1, 1) * block
        block_expert = (block_first_row >= padded_end.reshape(1, -1)).astype(ms.int32).sum(1)
        block_expert = ops.stop_gradient(ops.minimum(block_expert, self.num_experts - 1))
        x_blocks = ops.gather(_with_zero_row(x, self.compute_dtype), source, 0).reshape(blocks, block, x.shape[1])
        h = self.swiglu_mul(self.silu(self.gate_matmul(x_blocks, ops.gather(gate_weights, block_expert, 0))),
                            self.up_matmul(x_blocks, ops.gather(up_weights, block_expert, 0)))
        y = self.down_matmul(h, ops.gather(down_weights, block_expert, 0)).reshape(rows, x.shape[1])
        return _with_zero_row(y, y.dtype), row_of


class AllGatherDispatcher(nn.Cell):
    """Routed output of this rank's tokens when the experts are split over ``layout.expert_parallel`` ranks.

    construct(x [N, H], topk_idx int32 [N, K] (global experts), topk_weight [N, K], local stacked weights
    [E/ep, out, in] x 3) -> [N, H]."""

    def __init__(self, layout, top_k, block_size, compute_dtype, group=None):
        super().__init__()
        self.world, self.position = layout.expert_parallel, layout.position
        self.first_expert, self.local_count = layout.first_expert, layout.experts_per_rank
        self.gather_tokens = PaddedAllGather(self.world, self.position, group)
        self.gather_routing = PaddedAllGather(self.world, self.position, group)
        self.gather_weights = PaddedAllGather(self.world, self.position, group)
        self.reduce_output = ops.AllReduce() if group is None else ops.AllReduce(group=group)
        self.local_compute = LocalBlockSparseExperts(self.local_count, top_k, block_size, compute_dtype)
        self.top_k, self.compute_dtype = top_k, compute_dtype

    def local_selection(self, topk_idx):
        """Global expert ids [M, K] -> one-hot int32 [M*K, E_local] of the local experts (zero rows elsewhere)."""
        local_idx = topk_idx.reshape(-1) - self.first_expert
        valid = ops.logical_and(local_idx >= 0, local_idx < self.local_count)
        local_idx = ops.where(valid, local_idx, ops.full_like(local_idx, self.local_count))
        one_hot = ops.one_hot(local_idx, self.local_count + 1, ms.Tensor(1, ms.int32), ms.Tensor(0, ms.int32))
        return ops.stop_gradient(one_hot[:, :self.local_count])

    def construct(self, x, topk_idx, topk_weight, gate_weights, up_weights, down_weights):
        tokens = x.shape[0]
        all_x = self.gather_tokens(x)
        # ids travel as float32 (exact for any expert count below 2^24): one AllReduce dtype on every backend
        all_idx = ops.cast(self.gather_routing(ops.stop_gradient(ops.cast(topk_idx, ms.float32))), ms.int32)
        all_weight = self.gather_weights(topk_weight)
        selected = self.local_selection(all_idx)
        counts = selected.sum(0)
        y_rows, row_of = self.local_compute(all_x, selected, counts, gate_weights, up_weights, down_weights)
        partial = weighted_sum(ops.gather(y_rows, row_of, 0), all_weight, self.top_k, self.compute_dtype)
        total = self.reduce_output(partial)
        return total[self.position * tokens:(self.position + 1) * tokens]


# ----- alltoall: the permutation (pure NumPy, tested on CPU) ------------------------------------------------------

def destination_ranks(topk_idx, num_experts, expert_parallel):
    """Rank (position in the expert-parallel group) each (token, k) assignment goes to, flattened [N*K]."""
    return np.asarray(topk_idx).reshape(-1) // (num_experts // expert_parallel)


def permute_by_destination(destinations, world):
    """Stable sort of the assignments by destination -> (order [n]: sorted slot -> assignment, counts [world],
    inverse [n]: assignment -> sorted slot). ``x[order]`` is the send buffer, ``sent[inverse]`` undoes it."""
    destinations = np.asarray(destinations)
    order = np.argsort(destinations, kind="stable")
    counts = np.bincount(destinations, minlength=world).astype(np.int64)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return order, counts, inverse


def emulated_alltoallv(send_buffers, send_counts):
    """What AlltoAllV does across simulated ranks: rank r sends rows [sum(c[r,:d]), +c[r,d]) of its buffer to
    rank d; rank d receives the pieces in source-rank order. send_counts [world, world] -> receive buffers."""
    counts = np.asarray(send_counts)
    world = counts.shape[0]
    pieces = [np.split(np.asarray(buffer), np.cumsum(counts[rank])[:-1]) for rank, buffer in enumerate(send_buffers)]
    width = np.asarray(send_buffers[0]).shape[1:]
    return [np.concatenate([pieces[source][dest] for source in range(world)]) if counts[:, dest].sum()
            else np.zeros((0,) + width, np.asarray(send_buffers[0]).dtype) for dest in range(world)]


def alltoall_round_trip(rank_tokens, rank_destinations, expert_fn=None):
    """Permute, exchange, (compute), exchange back, unpermute for every simulated rank: the alltoall dispatcher's
    data movement. Returns each rank's rows in the original order (equal to the input when expert_fn is None)."""
    world = len(rank_tokens)
    permuted = [permute_by_destination(dest, world) for dest in rank_destinations]
    send = [np.asarray(tokens)[order] for tokens, (order, _, _) in zip(rank_tokens, permuted)]
    counts = np.stack([counts for _, counts, _ in permuted])
    received = emulated_alltoallv(send, counts)
    if expert_fn is not None:
        received = [expert_fn(rank, rows) for rank, rows in enumerate(received)]
    returned = emulated_alltoallv(received, counts.T)       # back: rank d sends c[s, d] rows to each source s
    return [rows[inverse] for rows, (_, _, inverse) in zip(returned, permuted)]


class AlltoAllDispatcher(nn.Cell):
    """The ``alltoall`` dispatcher for Ascend (AlltoAllV does not exist on CPU; never run there).

    construct(x [N, H], topk_idx [N, K], topk_weight, local weights x 3) -> [N, H]: assignments sorted by
    destination rank, per-rank counts exchanged (as an all-gathered [ep, ep] matrix), AlltoAllV of the token rows,
    the local block dispatch on the received rows, AlltoAllV back, unpermute and the router-weighted combine.
    Received sizes depend on the routing, so this path needs dynamic shapes (Ascend, GRAPH or PyNative)."""

    def __init__(self, layout, top_k, block_size, compute_dtype, group=None):
        super().__init__()
        self.world, self.position = layout.expert_parallel, layout.position
        self.per_rank, self.first_expert = layout.experts_per_rank, layout.first_expert
        self.top_k = top_k
        group = group or "hccl_world_group"
        self.exchange = ops.AlltoAllV(group=group, block_size=1)
        self.exchange_back = ops.AlltoAllV(group=group, block_size=1)
        self.gather_counts = ops.AllGather(group=group)
        self.local_compute = LocalBlockSparseExperts(self.per_rank, 1, block_size, compute_dtype)

    def construct(self, x, topk_idx, topk_weight, gate_weights, up_weights, down_weights):
        tokens, hidden = x.shape
        flat_idx = topk_idx.reshape(-1)
        order, inverse, counts = send_plan(flat_idx, self.per_rank, self.world)
        matrix = self.gather_counts(counts.reshape(1, -1))                       # [ep, ep]: row = source
        send_rows = ops.gather(x, order // self.top_k, 0)
        received = self.exchange(send_rows.reshape(-1), counts * hidden, matrix[:, self.position] * hidden)
        received_idx = self.exchange(ops.cast(ops.gather(flat_idx, order, 0), ms.float32), counts,
                                     matrix[:, self.position])
        rows = received.reshape(-1, hidden)
        local = ops.cast(received_idx, ms.int32) - self.first_expert
        selected = ops.one_hot(local, self.per_rank, ms.Tensor(1, ms.int32), ms.Tensor(0, ms.int32))
        y_rows, row_of = self.local_compute(rows, selected, selected.sum(0), gate_weights, up_weights, down_weights)
        y = ops.gather(y_rows, row_of, 0)
        back = self.exchange_back(y.reshape(-1), matrix[:, self.position] * hidden, counts * hidden)
        y_assign = ops.gather(back.reshape(-1, hidden), inverse, 0)              # [N*K, H] in assignment order
        return weighted_sum(y_assign, topk_weight, self.top_k, y_assign.dtype)


def make_dispatcher(layout, top_k, block_size, compute_dtype):
    """The layout's dispatcher Cell (`layout.dispatcher`: allgather or alltoall)."""
    cls = AlltoAllDispatcher if layout.dispatcher == "alltoall" else AllGatherDispatcher
    return cls(layout, top_k, block_size, compute_dtype)


def local_expert_bytes(model):
    """Bytes of the routed-expert Parameters this rank holds (measured from the parameters)."""
    from mindpretrain.parallel.expert_groups import expert_index
    return sum(int(np.prod(param.shape)) * param.data.itemsize for param in model.get_parameters()
               if expert_index(param.name) is not None)
