"""DeepSeekMoE block: sigmoid router with aux-loss-free bias, group-limited top-k, dropless dispatches.

Routing follows the DeepSeek-V3 report (arXiv 2412.19437, section 2.1.2) and HF `DeepseekV3MoE`; the output is the
router-weighted sum of the k routed SwiGLU experts plus the always-on shared experts. GRAPH mode wants static
shapes while a dropless MoE cannot know how many tokens each expert gets, so two dispatches lay the token-expert
assignments out grouped by expert in a buffer whose size is bounded statically: ``block_sparse`` (fixed-size
blocks, batched matmuls; every backend) and ``grouped_matmul`` (Ascend's GroupedMatmul kernel; never run on
Ascend); ``dense`` (dense_dispatch.py) runs every expert on every token where the block dispatch's weight copies
would cost more. The design, its costs, the measurements and what is tested are in research/deepseek3/README.md.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import GroupedMatmul, SiLU

from mindpretrain.validation import require
from research.deepseek3.capacity_dispatch import DEFAULT_CAPACITY_FACTOR, CapacityExperts
from research.deepseek3.deepseek3_config import BALANCE_LOSS_KINDS, MOE_DISPATCHES
from research.deepseek3.dense_dispatch import DenseExperts, dense_is_leaner
from research.deepseek3.layers import SwiGLU, broadcasts_explicitly, expand_to, ms_dtype, normal_weight


class ProjectionWeight(nn.Cell):
    """One routed-expert projection's HF-shaped `weight` [out, in] (or [experts, out, in], every expert's stacked);
    the dispatch computes with it."""

    def __init__(self, in_features, out_features, model_config, experts=None):
        super().__init__()
        shape = (out_features, in_features) if experts is None else (experts, out_features, in_features)
        self.weight = normal_weight(shape, model_config)


class RoutedExpert(nn.Cell):
    """A routed expert's `gate_proj/up_proj/down_proj.weight` (HF names), without compute of its own.

    Both dispatches compute all experts at once from the weights stacked across experts, so an expert holds no
    primitive (nothing for the shard plan to find) and is never called.
    """

    def __init__(self, hidden_size, intermediate_size, model_config):
        super().__init__()
        self.gate_proj = ProjectionWeight(hidden_size, intermediate_size, model_config)
        self.up_proj = ProjectionWeight(hidden_size, intermediate_size, model_config)
        self.down_proj = ProjectionWeight(intermediate_size, hidden_size, model_config)


class StackedRoutedExperts(nn.Cell):
    """Every routed expert's `gate_proj/up_proj/down_proj.weight` in one [E, out, in] Parameter each
    (`experts.gate_proj.weight`, ...; MindFormers' storage), read through Cast primitives whose strategies split
    the expert axis by ep: under semi-auto parallel each device then stores E/ep experts. Checkpoints keep the HF
    per-expert names (`mindpretrain.parallel.expert_groups.per_expert_name`). Used by the capacity dispatch
    and the exchanged grouped dispatch (exchanged_experts.py)."""

    def __init__(self, num_experts, hidden_size, intermediate_size, model_config):
        super().__init__()
        self.gate_proj = ProjectionWeight(hidden_size, intermediate_size, model_config, num_experts)
        self.up_proj = ProjectionWeight(hidden_size, intermediate_size, model_config, num_experts)
        self.down_proj = ProjectionWeight(intermediate_size, hidden_size, model_config, num_experts)
        self.cast_gate, self.cast_up, self.cast_down = ops.Cast(), ops.Cast(), ops.Cast()
        self.shard_ops = {"cast_gate": "moe.stacked_gate_weight", "cast_up": "moe.stacked_up_weight",
                          "cast_down": "moe.stacked_down_weight"}

    def weights(self, dtype):
        """(gate [E, I, H], up [E, I, H], down [E, H, I]) in `dtype`."""
        return (self.cast_gate(self.gate_proj.weight, dtype), self.cast_up(self.up_proj.weight, dtype),
                self.cast_down(self.down_proj.weight, dtype))


class GlobalIndexCellList(nn.CellList):
    """A CellList whose children are named ``first, first + 1, ...``: a rank holding experts [first, first + n)
    keeps their HF names (global indices). Integer indexing stays positional (GRAPH mode indexes by position)."""

    def __init__(self, cells, first=0):
        super().__init__(cells)
        if first:
            self._cells = type(self._cells)((str(first + index), cell)
                                            for index, cell in enumerate(self._cells.values()))

    def __getitem__(self, index):
        if isinstance(index, int):
            return list(self._cells.values())[index]
        return super().__getitem__(index)


class TopkRouter(nn.Cell):
    """Sigmoid gate with group-limited top-k; the bias only steers selection (aux-loss-free balancing).

    Scores ``s = sigmoid(x W_g^T)`` in float32; experts are chosen on ``s + b`` (``e_score_correction_bias``, a
    buffer updated by `expert_bias_update`) but weighted by ``s``. With ``topk_group < n_group`` a group scores
    the sum of its top-2 biased scores and only the best ``topk_group`` groups' experts compete. The weights are
    renormalised when ``norm_topk_prob`` (``+1e-20`` as HF) and scaled by ``routed_scaling_factor``.
    Sizes (n_group divides the experts, >= 2 experts per group, k fits the kept groups) are validated once, by
    `DeepseekV3Config`, when the config is loaded. The matmul, sigmoid, bias add and top-k's are primitives
    declared in `shard_ops` (kinds `moe.router`, `moe.router_*`, `moe.group_*`, `moe.topk`).
    """

    def __init__(self, model_config):
        super().__init__()
        self.num_experts = model_config.n_routed_experts
        self.top_k = model_config.num_experts_per_tok
        self.n_group = model_config.n_group or 1
        self.topk_group = model_config.topk_group or self.n_group
        self.norm_topk_prob = bool(model_config.norm_topk_prob)
        self.routed_scaling_factor = float(model_config.routed_scaling_factor)
        self.weight = normal_weight((self.num_experts, model_config.hidden_size), model_config)
        self.e_score_correction_bias = Parameter(Tensor(np.zeros(self.num_experts, np.float32)),
                                                 name="e_score_correction_bias", requires_grad=False)
        self.logits_matmul = ops.MatMul(transpose_b=True)
        self.sigmoid = ops.Sigmoid()
        self.bias_add = ops.Add()
        self.group_top2 = ops.TopK(sorted=True)
        self.group_topk = ops.TopK(sorted=True)
        self.topk = ops.TopK(sorted=True)
        self.shard_ops = {"logits_matmul": "moe.router", "sigmoid": "moe.router_sigmoid",
                          "bias_add": "moe.router_bias_add", "group_top2": "moe.group_top2",
                          "group_topk": "moe.group_topk", "topk": "moe.topk"}

    def construct(self, x):
        """x [N, H] -> (scores [N, E] fp32, topk_idx int32 [N, K], topk_weight fp32 [N, K])."""
        logits = self.logits_matmul(ops.cast(x, ms.float32), ops.cast(self.weight, ms.float32))
        scores = self.sigmoid(logits)
        choice = self.bias_add(scores, ops.stop_gradient(self.e_score_correction_bias))
        choice = ops.stop_gradient(choice)
        if self.topk_group < self.n_group:
            choice = self._keep_best_groups(choice)
        topk_idx = self.topk(choice, self.top_k)[1]
        topk_idx = ops.cast(topk_idx, ms.int32)
        topk_weight = ops.gather_elements(scores, 1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdims=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        return scores, topk_idx, topk_weight

    def _keep_best_groups(self, choice):
        """-inf for the experts outside the ``topk_group`` groups with the highest sum of their top-2 scores."""
        tokens = choice.shape[0]
        per_group = choice.reshape(tokens, self.n_group, self.num_experts // self.n_group)
        group_scores = self.group_top2(per_group, 2)[0].sum(-1)
        group_idx = self.group_topk(group_scores, self.topk_group)[1]
        group_mask = ops.one_hot(group_idx, self.n_group, Tensor(1.0, ms.float32),
                                 Tensor(0.0, ms.float32)).sum(1)
        expert_mask = ops.broadcast_to(group_mask.reshape(tokens, self.n_group, 1), per_group.shape)
        expert_mask = expert_mask.reshape(tokens, self.num_experts)
        return ops.where(expert_mask > 0.5, choice, ops.full_like(choice, float("-inf")))


def default_block_size(assignments, num_experts):
    """Power of two near assignments / (4 * experts), in [8, 128]: padding <= ~25% of rows, few weight copies."""
    target = assignments // (4 * num_experts)
    block = 8
    for candidate in (16, 32, 64, 128):
        if candidate <= target:
            block = candidate
    return block


def num_dispatch_blocks(tokens, top_k, num_experts, block):
    """Static bound on the blocks needed: sum_e ceil(c_e/b) <= (N*K + E*(b-1)) / b, and c_e <= N."""
    bound = (tokens * top_k + num_experts * (block - 1)) // block
    per_expert_max = (tokens + block - 1) // block
    return min(bound, num_experts * per_expert_max)


def dispatch_footprint(tokens, top_k, num_experts, hidden_size, intermediate_size, block=None):
    """Static sizes of the block dispatch for one MoE forward (for memory planning): block size, blocks, expert
    rows computed (vs N*K routed and E*N dense), and the gathered expert-weight elements kept for backward."""
    block = block or default_block_size(tokens * top_k, num_experts)
    blocks = num_dispatch_blocks(tokens, top_k, num_experts, block)
    return dict(block_size=block, blocks=blocks, expert_rows=blocks * block, routed_rows=tokens * top_k,
                dense_rows=tokens * num_experts, weight_copy_elements=blocks * 3 * hidden_size * intermediate_size)


# Ascend's grouped matmul over one expert-sorted token tensor: split_item=3 (x, weight and y are single tensors),
# group_type=0 (groups split the M axis of x), no bias/quant inputs, no transposes: the form whose backward the
# MindSpore 2.10 docs promise (ops/auto_generate/gen_ops_def.py, grouped_matmul) and the one MindFormers uses.
_ASCEND_GROUPED_MATMUL = GroupedMatmul(split_item=3, group_type=0)


def default_moe_dispatch(device_target=None, model_config=None):
    """``grouped_matmul`` on Ascend (its kernel exists there only); elsewhere ``block_sparse``, or ``dense`` when
    the block dispatch's weight copies for one sequence of `model_config` would outgrow the dense dispatch's
    activations (`dense_dispatch.dense_is_leaner`: few tokens per expert weight, e.g. the 1B recipe on CPU)."""
    device = str(device_target or ms.get_context("device_target")).upper()
    return "grouped_matmul" if device == "ASCEND" else reference_moe_dispatch(model_config)


def reference_moe_dispatch(model_config=None):
    """The non-Ascend default for `model_config` (None: ``block_sparse``), decided for one sequence of
    seq_length tokens; the planner asks the same question."""
    tokens = getattr(model_config, "seq_length", None)
    if tokens and model_config.n_routed_experts:
        top_k = model_config.num_experts_per_tok
        experts = model_config.n_routed_experts
        hidden, inner = model_config.hidden_size, model_config.moe_intermediate_size
        copies = dispatch_footprint(tokens, top_k, experts, hidden, inner,
                                    getattr(model_config, "moe_dispatch_block_size", None))["weight_copy_elements"]
        if dense_is_leaner(tokens, top_k, experts, hidden, inner, copies):
            return "dense"
    return "block_sparse"


def ascend_grouped_matmul(x, weight, group_list):
    """``y[rows of group g] = x[rows of group g] @ weight[g]`` by Ascend's GroupedMatmul kernel.

    x [M, K] with rows sorted by group, weight [G, K, N], group_list int64 [G] = *cumulative* row ends (the last
    equals M) -> y [M, N]. The one place the kernel is called; on CPU MindSpore 2.10 returns an empty tuple for it,
    so CPU runs (and tests) pass a reference function with this signature instead.
    """
    return _ASCEND_GROUPED_MATMUL([x], [weight], None, None, None, None, None, group_list)[0]


def _segment_rows(selected, segment_start):
    """Row of each assignment when expert e's rows start at ``segment_start[e]`` and assignments keep token order
    within an expert: start + exclusive rank among e's assignments (a cumsum over the one-hot, no sort)."""
    rank = ops.cumsum(selected, 0) - selected                                # [N*K, E]
    return ((rank + segment_start.reshape(1, -1)) * selected).sum(1)         # [N*K]


def _source_tokens(row_of, rows, tokens, top_k):
    """Inverse of ``row_of``: the token each row reads (``tokens`` = the appended zero row, for padding)."""
    source = ops.full((rows,), tokens, dtype=ms.int32)
    assignment_token = ops.arange(0, row_of.shape[0], dtype=ms.int32) // top_k
    return ops.stop_gradient(ops.tensor_scatter_elements(source, row_of, assignment_token, axis=0))


def expert_sorted_layout(selected, counts, top_k):
    """Token permutation for the grouped matmul: assignments sorted by expert, token order kept inside an expert.

    selected int32 [N*K, E] one-hot of each (token, k) assignment, counts int32 [E] -> (source int32 [N*K+E]: token
    index each sorted row reads, N meaning a zero row; row_of int32 [N*K]: sorted row of each assignment, the inverse
    permutation used to unpermute; group_list int64 [E]: cumulative row ends, the form GroupedMatmul takes).

    Every expert segment ends with one zero *guard row* (so it holds ``counts[e] + 1`` rows): group_list is then
    strictly increasing and no group is empty, which satisfies the strictest reading of the kernel's constraints
    (GroupedMatmulV4's docs ask for positive, increasing cumulative entries; MindFormers pads experts that got no
    token for the same reason, ``enable_gmm_safe_tokens``). Cost: E extra rows of N*K+E, zeros in, ignored out, and
    an expert with no token still gets an exactly zero weight gradient.
    """
    assignments, num_experts = selected.shape
    sizes = counts + 1
    group_end = ops.cumsum(sizes, 0)
    row_of = _segment_rows(selected, group_end - sizes)
    source = _source_tokens(row_of, assignments + num_experts, assignments // top_k, top_k)
    return source, ops.stop_gradient(row_of), ops.stop_gradient(ops.cast(group_end, ms.int64))


def grouped_matmul_footprint(tokens, top_k, num_experts, hidden_size, intermediate_size):
    """Static sizes of the grouped-matmul dispatch (compare `dispatch_footprint`): rows fed to the kernel and the
    elements of the stacked [E, in, out] expert weights it materialises per MoE layer (kept for backward)."""
    return dict(expert_rows=tokens * top_k + num_experts, routed_rows=tokens * top_k, dense_rows=tokens * num_experts,
                stacked_weight_elements=3 * num_experts * hidden_size * intermediate_size)


def grouped_swiglu(grouped_matmul, x_sorted, gate_weights, up_weights, down_weights, group_list):
    """Rows sorted by expert [M, H] -> each row's expert SwiGLU [M, H]: three grouped matmuls over the [E, out, in]
    weights (transposed to the kernel's [E, in, out]), `group_list` the cumulative row ends."""
    gate = grouped_matmul(x_sorted, ops.transpose(gate_weights, (0, 2, 1)), group_list)
    up = grouped_matmul(x_sorted, ops.transpose(up_weights, (0, 2, 1)), group_list)
    return grouped_matmul(ops.silu(gate) * up, ops.transpose(down_weights, (0, 2, 1)), group_list)


def _with_zero_row(x, dtype):
    """x [N, H] in ``dtype`` with one zero row appended: the row padding and guard rows read (index N)."""
    return ops.concat([ops.cast(x, dtype), ops.zeros((1, x.shape[1]), dtype)], axis=0)


class BlockSparseExperts(nn.Cell):
    """Routed compute of the ``block_sparse`` dispatch (every backend).

    Each expert's rows are padded to a multiple of the block size ``b``, so every block belongs to one expert and
    one batched matmul per projection covers all of them with the block's expert weights gathered:
    ``[blocks, b, H] x [blocks, I, H]^T``. The three batched matmuls, the SiLU and the gate * up product are
    primitives declared in `shard_ops` (kinds `moe.expert_*`, whose table entries describe these block shapes).
    """

    def __init__(self, num_experts, top_k, block_size, compute_dtype):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        self.gate_matmul = ops.BatchMatMul(transpose_b=True)     # x @ W^T without materialising W^T
        self.up_matmul = ops.BatchMatMul(transpose_b=True)
        self.down_matmul = ops.BatchMatMul(transpose_b=True)
        self.silu = SiLU()
        self.swiglu_mul = ops.Mul()
        self.shard_ops = {"gate_matmul": "moe.expert_gate_proj", "up_matmul": "moe.expert_up_proj",
                          "down_matmul": "moe.expert_down_proj", "silu": "moe.expert_silu",
                          "swiglu_mul": "moe.expert_swiglu_mul"}

    def construct(self, x, selected, counts, gate_weights, up_weights, down_weights):
        """x [N, H], selected int32 [N*K, E], counts [E], weights [E, out, in] -> (y_rows [rows, H], row_of [N*K])."""
        tokens = x.shape[0]
        block = self.block_size or default_block_size(tokens * self.top_k, self.num_experts)
        blocks = num_dispatch_blocks(tokens, self.top_k, self.num_experts, block)
        rows = blocks * block

        # Layout: expert e's rows start at padded_start[e]; an assignment's row = start + rank among e's assignments.
        padded = (counts + (block - 1)) // block * block                         # [E]
        padded_end = ops.cumsum(padded, 0)
        row_of = _segment_rows(selected, padded_end - padded)                    # [N*K]
        source = _source_tokens(row_of, rows, tokens, self.top_k)                # row -> token (tokens = zero row)

        # Block b belongs to the expert whose padded segment covers row b*block (tail blocks: last expert, zeros).
        block_first_row = ops.arange(0, blocks, dtype=ms.int32).reshape(-1, 1) * block
        block_expert = (block_first_row >= padded_end.reshape(1, -1)).astype(ms.int32).sum(1)
        block_expert = ops.stop_gradient(ops.minimum(block_expert, self.num_experts - 1))

        x_blocks = ops.gather(_with_zero_row(x, self.compute_dtype), source, 0).reshape(blocks, block, x.shape[1])
        gate_w = ops.gather(gate_weights, block_expert, 0)                     # [blocks, I, H]
        up_w = ops.gather(up_weights, block_expert, 0)
        down_w = ops.gather(down_weights, block_expert, 0)                     # [blocks, H, I]
        h = self.swiglu_mul(self.silu(self.gate_matmul(x_blocks, gate_w)), self.up_matmul(x_blocks, up_w))
        return self.down_matmul(h, down_w).reshape(rows, x.shape[1]), row_of


class GroupedMatmulExperts(nn.Cell):
    """Routed compute of the ``grouped_matmul`` dispatch (Ascend's kernel, or a reference injected on CPU).

    Tokens permuted (stably sorted) by expert, one guard row per expert (`expert_sorted_layout`), three grouped
    matmuls over [E, in, out] weights: the per-expert [out, in] Parameters stacked and transposed at runtime.
    No primitive is declared for sharding: the kernel is one module-level primitive and expert parallelism (its
    AlltoAll token exchange) is not implemented, so this path is left to sharding propagation.
    """

    def __init__(self, top_k, grouped_matmul, compute_dtype):
        super().__init__()
        self.top_k = top_k
        self.grouped_matmul = grouped_matmul
        self.compute_dtype = compute_dtype

    def construct(self, x, selected, counts, gate_weights, up_weights, down_weights):
        """Same arguments as `BlockSparseExperts` -> (y_sorted [N*K+E, H], row_of [N*K])."""
        source, row_of, group_list = expert_sorted_layout(selected, counts, self.top_k)
        x_sorted = ops.gather(_with_zero_row(x, self.compute_dtype), source, 0)   # [N*K+E, H]
        return grouped_swiglu(self.grouped_matmul, x_sorted, gate_weights, up_weights, down_weights,
                              group_list), row_of


class DeepseekV3MoE(nn.Cell):
    """Routed + shared experts. ``construct(hidden [B,S,H], real_tokens=None) -> (out [B,S,H], load fp32 [E],
    balance_loss)``.

    ``dispatch`` (or ``model_config.moe_dispatch``; None = `default_moe_dispatch` for the current device) picks the
    routed compute: ``"block_sparse"``, ``"grouped_matmul"`` or ``"capacity"`` (MindFormers' capacity layout,
    assignments past the capacity dropped, experts split by ep: capacity_dispatch.py). ``grouped_matmul`` is the
    kernel function of the grouped path (default `ascend_grouped_matmul`; CPU tests pass a reference with the
    same signature).
    Parameters keep HF's names: ``gate.*``, ``experts.{e}.{gate,up,down}_proj.weight``, ``shared_experts.*``; the
    capacity dispatch stores the routed experts stacked, ``experts.{gate,up,down}_proj.weight`` [E, out, in]
    (`StackedRoutedExperts`), mapped to the HF names at checkpoint IO.
    """

    def __init__(self, model_config, block_size=None, dispatch=None, grouped_matmul=None):
        super().__init__()
        self.num_experts = model_config.n_routed_experts
        self.top_k = model_config.num_experts_per_tok
        self.hidden_size = model_config.hidden_size
        self.compute_dtype = ms_dtype(model_config.compute_dtype)
        self.block_size = block_size or getattr(model_config, "moe_dispatch_block_size", None)
        self.expert_layout = getattr(model_config, "expert_layout", None)
        partitioned = self.expert_layout is not None and self.expert_layout.partitioned
        self.dispatch = (dispatch or getattr(model_config, "moe_dispatch", None)
                         or default_moe_dispatch(model_config=None if partitioned else model_config))
        require(self.dispatch in MOE_DISPATCHES, "moe_dispatch", self.dispatch, f"must be one of {MOE_DISPATCHES}")
        if self.dispatch == "grouped_matmul" and grouped_matmul is None:
            device = ms.get_context("device_target")
            require(str(device).upper() == "ASCEND", "moe_dispatch", self.dispatch,
                    f"needs Ascend's GroupedMatmul kernel, which MindSpore does not implement on device_target "
                    f"{device}: use block_sparse there")
            grouped_matmul = ascend_grouped_matmul
        self.grouped_matmul = grouped_matmul
        self.balance_alpha = float(getattr(model_config, "seq_balance_loss_alpha", 0.0) or 0.0)
        self.balance_kind = getattr(model_config, "balance_loss_kind", None) or "sequence"
        require(self.balance_kind in BALANCE_LOSS_KINDS, "balance_loss_kind", self.balance_kind,
                f"must be one of {BALANCE_LOSS_KINDS}")
        self.balance_groups = int(getattr(model_config, "balance_loss_token_groups", None) or 1)
        # MindFormers takes f from an unbiased top-k whenever the bias balancing is on (balance_via_topk_bias)
        self.balance_unbiased_topk = float(getattr(model_config, "topk_bias_update_rate", 0.0) or 0.0) > 0
        self.gate = TopkRouter(model_config)
        local = self.expert_layout.local_experts if partitioned else range(self.num_experts)
        # semi-auto parallel with expert_parallel > 1 (the launcher sets expert_exchange): MindFormers' MoEV3 layout
        self.exchanged = (self.dispatch == "grouped_matmul"
                          and getattr(model_config, "expert_exchange", None) is not None)
        self.stacked_experts = (self.dispatch == "capacity" or self.exchanged) and not partitioned
        if self.stacked_experts:        # one [E, out, in] Parameter per projection, split by ep under semi-auto
            self.experts = StackedRoutedExperts(self.num_experts, model_config.hidden_size,
                                                model_config.moe_intermediate_size, model_config)
        else:
            self.experts = GlobalIndexCellList([RoutedExpert(model_config.hidden_size,
                                                             model_config.moe_intermediate_size, model_config)
                                                for _ in local], local.start)
        self.expert_dispatcher = None
        if partitioned:
            require(self.dispatch == "block_sparse", "moe_dispatch", self.dispatch,
                    "must be block_sparse with expert_parallel > 1 (the dispatchers compute local blocks)")
            from research.deepseek3.expert_parallel import make_dispatcher
            self.expert_dispatcher = make_dispatcher(self.expert_layout, self.top_k, self.block_size,
                                                     self.compute_dtype)
        if self.exchanged:                          # research/deepseek3/exchanged_experts.py (dropless, E/ep)
            from research.deepseek3.exchanged_experts import ExchangedGroupedExperts   # imports this module

            self.routed_compute = ExchangedGroupedExperts(model_config.expert_exchange, self.num_experts, self.top_k,
                                                          grouped_matmul, self.compute_dtype)
        elif self.dispatch == "grouped_matmul":
            self.routed_compute = GroupedMatmulExperts(self.top_k, grouped_matmul, self.compute_dtype)
        elif self.dispatch == "dense":              # research/deepseek3/dense_dispatch.py (no weight copies)
            self.routed_compute = DenseExperts(self.num_experts, self.top_k, self.compute_dtype)
        elif self.dispatch == "capacity":           # research/deepseek3/capacity_dispatch.py (drops past C)
            self.routed_compute = CapacityExperts(
                self.num_experts, self.top_k, getattr(model_config, "moe_capacity_factor", DEFAULT_CAPACITY_FACTOR),
                self.compute_dtype)
        else:
            self.routed_compute = BlockSparseExperts(self.num_experts, self.top_k, self.block_size,
                                                     self.compute_dtype)
        self.shared_experts = None
        if model_config.n_shared_experts:
            self.shared_experts = SwiGLU(model_config.hidden_size,
                                         model_config.moe_intermediate_size * model_config.n_shared_experts,
                                         model_config, "moe.shared_")
        self.combine_mul = ops.Mul()
        self.explicit_broadcast = broadcasts_explicitly()
        self.shard_ops = {"combine_mul": "moe.combine_mul"}

    def _per_expert(self, which):
        """One projection's weight of every expert, each in the compute dtype (the dense dispatch reads them so)."""
        weights = ()
        for expert in self.experts:
            weight = getattr(expert, which).weight
            if weight.dtype != self.compute_dtype:
                weight = ops.cast(weight, self.compute_dtype)
            weights = weights + (weight,)
        return weights

    def _stacked(self, which):
        """[E, out, in] view of one projection across experts (ops.stack passes gradients to each Parameter)."""
        weights = []
        for expert in self.experts:
            weights.append(getattr(expert, which).weight)
        return ops.cast(ops.stack(weights), self.compute_dtype)

    def construct(self, hidden, real_tokens=None):
        """`real_tokens` float32 [B, S] (1 = a document's token, 0 = padding of a packed row; None = every token)
        keeps padding out of the expert load (hence the bias statistics) and the balance loss; padding is still
        routed and computed (static shapes), its output simply never reaches a trained position."""
        batch, seq, hidden_size = hidden.shape
        tokens = batch * seq
        x = hidden.reshape(tokens, hidden_size)
        # Shared experts first, on x: x's gradient then sums its parts in the order that keeps training bit-equal
        # (PyNative and GRAPH) to the formulation before the MoE used layers.SwiGLU.
        shared = None
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
        scores, topk_idx, topk_weight = self.gate(x)

        selected = ops.one_hot(topk_idx.reshape(-1), self.num_experts, Tensor(1, ms.int32), Tensor(0, ms.int32))
        selected = ops.stop_gradient(selected)                                   # [N*K, E]
        counts = selected.sum(0)                                                 # [E]
        if real_tokens is None:
            load = ops.stop_gradient(ops.cast(counts, ms.float32))
        else:
            load = ops.stop_gradient((ops.cast(selected, ms.float32) *
                                      self._per_assignment(real_tokens).reshape(-1, 1)).sum(0))

        if self.stacked_experts:                   # combine themselves (capacity: dropped assignments)
            gate_weights, up_weights, down_weights = self.experts.weights(self.compute_dtype)
            out = self.routed_compute(x, topk_idx, topk_weight, gate_weights, up_weights, down_weights)
        elif self.dispatch == "dense":
            out = self.routed_compute(x, selected, topk_weight, self._per_expert("gate_proj"),
                                      self._per_expert("up_proj"), self._per_expert("down_proj"))
        elif self.expert_dispatcher is None:
            out = self._dispatch_compute_combine(x, selected, counts, topk_weight)
        else:
            out = self.expert_dispatcher(x, topk_idx, topk_weight, self._stacked("gate_proj"),
                                         self._stacked("up_proj"), self._stacked("down_proj"))
        if self.shared_experts is not None:
            out = out + shared
        out = out.reshape(batch, seq, hidden_size)

        return out, load, self._balance_loss(scores, selected, real_tokens, batch, seq)

    def _balance_loss(self, scores, selected, real_tokens, batch, seq):
        """scores fp32 [N, E], selected int32 [N*K, E] -> the balance loss of `balance_kind` (0 if alpha = 0)."""
        if self.balance_alpha <= 0:
            return Tensor(0.0, ms.float32)
        if self.balance_kind == "mindformers_expert":
            return self._mindformers_expert_balance_loss(scores, selected, real_tokens)
        if real_tokens is None:
            return self._sequence_balance_loss(scores.reshape(batch, seq, self.num_experts),
                                               selected.reshape(batch, seq * self.top_k, self.num_experts))
        return self._real_token_balance_loss(scores.reshape(batch, seq, self.num_experts),
                                             selected.reshape(batch, seq * self.top_k, self.num_experts),
                                             ops.cast(real_tokens, ms.float32))

    def _per_assignment(self, real_tokens):
        """float32 [B, S] token weights -> [B, S * K], one per (token, k) assignment, in `selected`'s order."""
        batch, seq = real_tokens.shape
        weights = ops.cast(real_tokens, ms.float32).reshape(batch, seq, 1)
        return ops.broadcast_to(weights, (batch, seq, self.top_k)).reshape(batch, seq * self.top_k)

    def _dispatch_compute_combine(self, x, selected, counts, topk_weight):
        """x [N, H] -> the routed experts' weighted sum per token [N, H]."""
        y_rows, row_of = self.routed_compute(x, selected, counts, self._stacked("gate_proj"),
                                             self._stacked("up_proj"), self._stacked("down_proj"))
        return self._combine(y_rows, row_of, topk_weight)

    def _combine(self, y_rows, row_of, topk_weight):
        """Unpermute: each token sums its K rows, weighted by the router's (unbiased, scaled) weights."""
        tokens = topk_weight.shape[0]
        y_assign = ops.gather(y_rows, row_of, 0).reshape(tokens, self.top_k, y_rows.shape[1])
        weight = ops.cast(topk_weight, self.compute_dtype).reshape(tokens, self.top_k, 1)
        return self.combine_mul(y_assign, expand_to(weight, y_assign.shape, self.explicit_broadcast)).sum(1)

    def _sequence_balance_loss(self, scores, selected):
        """alpha * mean_b sum_i f_i P_i with f_i = E/(K T) * #tokens choosing i, P_i = mean_t s_i / sum_j s_j;
        the complementary sequence-wise loss of the report (eq. 17-20); alpha = 0 skips it."""
        seq = scores.shape[1]
        normalised = scores / scores.sum(-1, keepdims=True)
        p = normalised.mean(1)                                                   # [B, E]
        f = ops.cast(selected.sum(1), ms.float32) * (self.num_experts / (self.top_k * seq))
        return self.balance_alpha * (ops.stop_gradient(f) * p).sum(-1).mean()

    def _real_token_balance_loss(self, scores, selected, real_tokens):
        """`_sequence_balance_loss` over each row's real tokens only: T = the row's count of real tokens, f and
        P sum over those tokens (a row of padding only contributes 0)."""
        tokens = ops.maximum(real_tokens.sum(1, keepdims=True), 1.0)             # [B, 1]
        normalised = scores / scores.sum(-1, keepdims=True)
        p = (normalised * ops.expand_dims(real_tokens, -1)).sum(1) / tokens     # [B, E]
        chosen = ops.cast(selected, ms.float32) * ops.expand_dims(self._per_assignment(real_tokens), -1)
        f = chosen.sum(1) * (self.num_experts / self.top_k) / tokens
        return self.balance_alpha * (ops.stop_gradient(f) * p).sum(-1).mean()

    def _mindformers_expert_balance_loss(self, scores, selected, real_tokens):
        """MindFormers' "expert" aux loss (TopkRouterV2 and MoEV3 `_expert_load_balancing`, r1.6 / June 2025):
        ``alpha * E^2 * mean_{g,i} P_gi F_gi`` over `balance_groups` contiguous token groups of the micro batch
        (not per sequence), P_gi = mean_t s_ti / (sum_j s_tj + 1e-9), F_gi = share of the group's K*T assignments
        on expert i. F comes from a top-k of the unbiased, not group-limited scores when the bias balancing is on
        (as there), else from the routing. With `real_tokens`, a packed row's padding is left out of T, P and F."""
        tokens, experts = scores.shape
        normalised = scores / (scores.sum(-1, keepdims=True) + 1e-9)             # [N, E]
        if self.balance_unbiased_topk:
            aux_idx = ops.topk(ops.stop_gradient(normalised), self.top_k)[1].reshape(-1)
            selected = ops.one_hot(ops.cast(aux_idx, ms.int32), experts, Tensor(1, ms.int32), Tensor(0, ms.int32))
        chosen = ops.cast(ops.stop_gradient(selected), ms.float32)             # [N*K, E]
        per_group = tokens // self.balance_groups
        weight = ops.ones((tokens,), ms.float32) if real_tokens is None else ops.cast(real_tokens, ms.float32)
        weight = weight.reshape(self.balance_groups, per_group, 1)
        counted = ops.maximum(weight.sum(1), 1.0)                                # [G, 1]
        p = (normalised.reshape(self.balance_groups, per_group, experts) * weight).sum(1) / counted
        chosen = chosen.reshape(self.balance_groups, per_group, self.top_k, experts) * ops.expand_dims(weight, -1)
        f = chosen.sum(2).sum(1) / (counted * self.top_k)                        # [G, E]
        return (ops.stop_gradient(f) * p).mean() * (self.balance_alpha * experts * experts)


def expert_bias_update(bias_np, load_np, rate):
    """Aux-loss-free balancing step: ``bias + rate * sign(mean(load) - load)`` (overloaded experts go down)."""
    bias = np.asarray(bias_np, dtype=np.float32)
    load = np.asarray(load_np, dtype=np.float32)
    return (bias + np.float32(rate) * np.sign(load.mean(-1, keepdims=True) - load)).astype(np.float32)
