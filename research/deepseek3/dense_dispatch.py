"""The ``dense`` routed compute: every expert runs on every token, its output weighted by the token's router
weight for that expert (0 where the expert was not selected), one expert after the other.

Why: the block dispatch (moe.py `BlockSparseExperts`) copies the selected experts' weights once per block and
keeps the copies for backward. That is cheap when an expert sees many tokens per weight element (the CPU
benchmark: 2048 tokens, experts of 128 x 256) and ruinous when it sees few (the 1B recipe at seq 256: 79 blocks of
32 rows over experts of 2048 x 2048, 3.97 G elements, about 16 GB of fp32 per MoE layer with their gradients).
Here each expert reads its own Parameters directly (no stack, no gather), so the only per-expert memory is its
[N, I] activations; the price is E x N expert rows instead of about N x K. `dense_is_leaner` chooses between the
two from their static sizes; `moe_dispatch: dense` forces it.

Exact and dropless like the other dispatches: out_n = sum_e w_ne * expert_e(x_n), summed in expert order; an
expert that no token selected gets an exactly zero weight gradient (all its output is multiplied by 0).
"""
from mindspore import nn, ops

from research.deepseek3.layers import broadcasts_explicitly, expand_to


def dense_footprint(tokens, num_experts, hidden_size, intermediate_size):
    """Rows computed and the elements the experts keep for backward: per expert and token its gate, up, silu
    and product [I] (the planner's convention for a SwiGLU) and its output [H] (the combine weight's gradient)."""
    return dict(expert_rows=tokens * num_experts,
                kept_activation_elements=num_experts * tokens * (4 * intermediate_size + hidden_size))


def dense_is_leaner(tokens, top_k, num_experts, hidden_size, intermediate_size, block_copy_elements):
    """True when the block dispatch's expert-weight copies (`block_copy_elements`, moe.dispatch_footprint) outgrow
    4x the dense dispatch's kept activations: then the copies, not the extra rows, decide memory and time
    (1B at seq 256: 994 M vs 4 x 42 M elements). The benchmark's shape stays on blocks (3.8 M vs 4 x 3.1 M)."""
    dense = dense_footprint(tokens, num_experts, hidden_size, intermediate_size)
    return block_copy_elements > 4 * dense["kept_activation_elements"] and top_k < num_experts


class DenseExperts(nn.Cell):
    """`construct(x [N, H], selected int [N*K, E], topk_weight [N, K], gate, up, down)` with per-expert weight
    tuples (gate/up [I, H], down [H, I], each expert's own Parameter cast to the compute dtype) -> [N, H]."""

    def __init__(self, num_experts, top_k, compute_dtype):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.compute_dtype = compute_dtype
        self.explicit_broadcast = broadcasts_explicitly()
        self.matmul = ops.MatMul(transpose_b=True)

    def expert_weights(self, x, selected, topk_weight):
        """[N, E] router weight of every (token, expert), 0 where the expert was not among the token's top k."""
        tokens = x.shape[0]
        choice = ops.cast(selected, self.compute_dtype).reshape(tokens, self.top_k, self.num_experts)
        weight = ops.cast(topk_weight, self.compute_dtype).reshape(tokens, self.top_k, 1)
        return (choice * expand_to(weight, choice.shape, self.explicit_broadcast)).sum(1)

    def construct(self, x, selected, topk_weight, gate_weights, up_weights, down_weights):
        if x.dtype != self.compute_dtype:
            x = ops.cast(x, self.compute_dtype)
        weights = self.expert_weights(x, selected, topk_weight)
        out = None
        for expert in range(self.num_experts):
            hidden = ops.silu(self.matmul(x, gate_weights[expert])) * self.matmul(x, up_weights[expert])
            y = self.matmul(hidden, down_weights[expert])
            y = y * expand_to(weights[:, expert:expert + 1], y.shape, self.explicit_broadcast)
            out = y if out is None else out + y
        return out
