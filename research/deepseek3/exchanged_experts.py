"""Dropless expert parallelism under semi-auto parallel: MindFormers' MoEV3 (`use_gmm: True`) layout.

The routed experts are stored stacked, [E, out, in], split over the ep devices of each token group; the tokens
of a stage are split over all dp x mp devices. One per-device function (`device_step`), wrapped in a `Morph`
primitive whose layouts say exactly that, runs on each device's slices: assignments sorted by destination
device, token rows and expert ids exchanged with per-device counts (AlltoAllV), the local experts computed as
one grouped matmul over rows sorted by expert, the rows exchanged back, unpermuted and combined with the router
weights. No assignment is dropped: the received row count follows the routing (dynamic shapes, Ascend).

The permutations are plain functions of MindSpore ops shared with the data-parallel ``alltoall`` dispatcher
(expert_parallel.py). On CPU the same `device_step` runs inside the Morph with ep = 1 (no exchange), and the
two-device data movement is checked phase by phase with an emulated exchange (tests/model/test_exchanged_experts.py);
the collectives themselves only exist on Ascend.
"""
import mindspore as ms
from mindspore import nn, ops

from mindpretrain.validation import require
from research.deepseek3.moe import _with_zero_row, grouped_swiglu


def stable_order(keys):
    """int32 keys [M] >= 0 -> (order [M]: sorted slot -> index, inverse [M]: index -> sorted slot), ties kept in
    index order: each key made unique as key * M + index and sorted as float32 (Ascend's Sort), exact while
    max key x M < 2^24 (a 671B device sorts 8192 assignments over 8 destinations, then ~8192 rows over 32
    experts)."""
    size = keys.shape[0]
    unique = keys * size + ops.arange(0, size, dtype=ms.int32)
    order = ops.sort(ops.cast(unique, ms.float32))[1]
    inverse = ops.sort(ops.cast(order, ms.float32))[1]
    return ops.stop_gradient(order), ops.stop_gradient(inverse)


def send_plan(flat_idx, experts_per_rank, world):
    """Global expert ids [M] -> (order, inverse, counts int32 [world]): the assignments sorted by destination
    device (``expert // experts_per_rank``), stable; ``rows[order]`` is the send buffer, ``back[inverse]``
    returns the rows to assignment order, ``counts[d]`` rows go to device d."""
    destination = flat_idx // experts_per_rank
    order, inverse = stable_order(destination)
    counts = ops.one_hot(destination, world, ms.Tensor(1, ms.int32), ms.Tensor(0, ms.int32)).sum(0)
    return order, inverse, ops.stop_gradient(counts)


def local_expert_rows(rows, local_ids, gate_weights, up_weights, down_weights, grouped_matmul, compute_dtype):
    """Received rows [R, H] and their local expert ids int32 [R] -> each row's expert output [R, H], in row order:
    rows stably sorted by expert, one grouped matmul per projection (weights [E_local, out, in]), unsorted."""
    num_local = gate_weights.shape[0]
    order, inverse = stable_order(local_ids)
    counts = ops.one_hot(local_ids, num_local, ms.Tensor(1, ms.int32), ms.Tensor(0, ms.int32)).sum(0)
    group_list = ops.stop_gradient(ops.cast(ops.cumsum(counts, 0), ms.int64))
    x = ops.gather(ops.cast(rows, compute_dtype), order, 0)
    y = grouped_swiglu(grouped_matmul, x, gate_weights, up_weights, down_weights, group_list)
    return ops.gather(y, inverse, 0)


def weighted_sum(y_assign, topk_weight, top_k, dtype):
    """Rows [N*K, H] in assignment order -> [N, H]: each token's K rows weighted by the router (the combine)."""
    tokens = topk_weight.shape[0]
    weight = ops.cast(topk_weight, dtype).reshape(tokens, top_k, 1)
    return (y_assign.reshape(tokens, top_k, y_assign.shape[-1]) * weight).sum(1)


def send_side(tokens, topk_idx, num_experts, world, top_k):
    """This device's send buffer: tokens [N, H], topk_idx int32 [N, K] -> (rows [N*K + E, H] sorted by destination
    device, their expert ids int32 [N*K + E], counts int32 [world] per destination, inverse [N*K + E]).

    E *guard rows* follow the N*K assignments: one zero row for every expert (MindFormers' safe tokens), so every
    device receives rows and every local expert at least one row per source device (AlltoAllV returns a
    shapeless tensor for an empty receive, and the grouped matmul wants non-empty groups); their outputs are
    dropped by the combine."""
    assignments = topk_idx.shape[0] * top_k
    flat_idx = ops.concat((topk_idx.reshape(-1), ops.arange(0, num_experts, dtype=ms.int32)))
    source = ops.concat((ops.arange(0, assignments, dtype=ms.int32) // top_k,
                         ops.full((num_experts,), tokens.shape[0], dtype=ms.int32)))
    order, inverse, counts = send_plan(flat_idx, num_experts // world, world)
    rows = ops.gather(_with_zero_row(tokens, tokens.dtype), ops.gather(source, order, 0), 0)
    return rows, ops.gather(flat_idx, order, 0), counts, inverse


def combine(returned, inverse, topk_weight, top_k):
    """Rows back from the experts [N*K + E, H] in send order -> [N, H]: assignment order restored, guard rows
    dropped, each token's K rows weighted by the router."""
    assignments = topk_weight.shape[0] * top_k
    y_assign = ops.gather(returned, inverse[:assignments], 0)
    return weighted_sum(y_assign, topk_weight, top_k, returned.dtype)


def _to_host(counts):
    """Counts as the int64 host lists AlltoAllV takes (MindFormers moves them with MoveTo as well)."""
    return ops.MoveTo()(ops.cast(counts, ms.int64), "CPU", True)


def exchange_rows(group, rows, send_counts, recv_counts):
    """AlltoAllV of rows [M, W] over `group`: send_counts[d] rows to device d, recv_counts[s] from device s."""
    width = rows.shape[-1]
    return ops.AlltoAllV(group=group, block_size=width)(rows.reshape(-1), send_counts, recv_counts).reshape(-1, width)


def make_device_step(exchange, num_experts, top_k, grouped_matmul, compute_dtype):
    """The per-device function of the Morph: (x [1, n, H], topk_idx [1, n, K], topk_weight [1, n, K],
    gate/up [E/ep, I, H], down [E/ep, H, I]) -> routed output [1, n, H]. With ep 1 nothing is exchanged."""
    world, group = exchange.expert_parallel, exchange.group
    first = exchange.position * (num_experts // world)

    def local_step(x, topk_idx, topk_weight, gate_weights, up_weights, down_weights):
        rows, ids, _, inverse = send_side(x.reshape(-1, x.shape[-1]), topk_idx.reshape(-1, top_k), num_experts, 1,
                                          top_k)
        y = local_expert_rows(rows, ids, gate_weights, up_weights, down_weights, grouped_matmul, compute_dtype)
        return combine(y, inverse, topk_weight.reshape(-1, top_k), top_k).reshape(x.shape)

    def exchanging_step(x, topk_idx, topk_weight, gate_weights, up_weights, down_weights):
        rows, ids, counts, inverse = send_side(x.reshape(-1, x.shape[-1]), topk_idx.reshape(-1, top_k),
                                               num_experts, world, top_k)
        # Ascend: the counts by AlltoAll, the rows and ids by AlltoAllV, the outputs back by AlltoAllV
        received = ops.AlltoAll(split_count=world, split_dim=0, concat_dim=0, group=group)(counts.reshape(-1, 1))
        send_counts, recv_counts = _to_host(counts), _to_host(received.reshape(-1))
        rows = exchange_rows(group, rows, send_counts, recv_counts)
        ids = ops.cast(exchange_rows(group, ops.cast(ids, ms.float32).reshape(-1, 1), send_counts,
                                     recv_counts).reshape(-1), ms.int32)
        y = local_expert_rows(rows, ids - first, gate_weights, up_weights, down_weights, grouped_matmul,
                              compute_dtype)
        back = exchange_rows(group, y, recv_counts, send_counts)
        return combine(back, inverse, topk_weight.reshape(-1, top_k), top_k).reshape(x.shape)

    return exchanging_step if world > 1 else local_step


def _same_shape(*args):
    return args[0]


class ExchangedGroupedExperts(nn.Cell):
    """Routed output of the dropless expert-parallel dispatch: ``construct(x [N, H], topk_idx [N, K],
    topk_weight [N, K], gate/up/down stacked [E, out, in]) -> [N, H]``.

    The tokens are viewed as ``exchange.token_shards`` shards (dp x mp under semi-auto parallel) for the Morph, whose
    layout (shard table kind ``moe.exchanged_experts``) gives each device one shard and E/ep experts."""

    def __init__(self, exchange, num_experts, top_k, grouped_matmul, compute_dtype):
        super().__init__()
        require(num_experts % exchange.expert_parallel == 0, "parallel_config.expert_parallel",
                exchange.expert_parallel, f"must divide n_routed_experts ({num_experts})")
        self.token_shards = exchange.token_shards
        self.exchange = ops.Morph(make_device_step(exchange, num_experts, top_k, grouped_matmul, compute_dtype),
                                  _same_shape, _same_shape).add_prim_attr("self_define_shard", True)
        self.shard_ops = {"exchange": "moe.exchanged_experts"}

    def construct(self, x, topk_idx, topk_weight, gate_weights, up_weights, down_weights):
        tokens, hidden = x.shape
        shards = self.token_shards
        out = self.exchange(x.reshape(shards, -1, hidden), topk_idx.reshape(shards, tokens // shards, -1),
                            topk_weight.reshape(shards, tokens // shards, -1), gate_weights, up_weights,
                            down_weights)
        return out.reshape(tokens, hidden)
