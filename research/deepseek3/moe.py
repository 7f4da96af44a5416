"""DeepSeekMoE block: sigmoid router with aux-loss-free bias, group-limited top-k, two dropless dispatches.

Semantics follow the DeepSeek-V3 report (arXiv 2412.19437, section 2.1.2) and HF `DeepseekV3MoE`:

* router logits in float32, scores ``s = sigmoid(x W_g^T)``;
* selection uses the biased scores ``s + b`` (``gate.e_score_correction_bias``, a non-trained buffer updated by
  :func:`expert_bias_update`), weights use the unbiased ``s``;
* group-limited routing: experts are split into ``n_group`` groups, a group scores the sum of its top-2 biased
  scores, the best ``topk_group`` groups survive and the top-k runs over their experts only;
* ``norm_topk_prob`` renormalises the k weights (``+1e-20`` as HF does), then ``routed_scaling_factor`` scales;
* output = sum of the k routed SwiGLU experts (weighted) + the always-on shared experts.

Dispatch design (why blocks)
----------------------------
MindSpore GRAPH mode wants static shapes, and a dropless MoE does not know in advance how many tokens each expert
gets. A per-expert capacity buffer that is dropless must hold all N tokens, which costs as much as running every
expert on every token. Instead the N*K token-expert assignments are laid out *grouped by expert*, each expert's
segment padded up to a multiple of a block size ``b``. The padded total is bounded statically:
``sum_e ceil(c_e / b) * b <= N*K + E*(b-1)``, so the buffer has a fixed number of blocks and every block belongs to
exactly one expert. Compute is one batched matmul over blocks with the block's expert weights gathered
(``[blocks, b, H] x [blocks, H, I]``): a "grouped GEMM" emulated with BatchMatMul, which runs on every backend.

* Exactness: no token is dropped; each token's output is gathered back from its K rows and summed over K, so the
  result equals HF's per-expert loop up to float summation order (tests: <= 1e-5 in fp32, gradients too).
* Compute: ``N*K + E*(b-1)`` expert rows instead of ``E*N`` (dense). Unused tail blocks and padding rows are fed
  zeros and never read back, so an expert that receives no token gets an exactly zero weight gradient.
* Memory: the selected expert weights are copied once per block (``blocks * 3*I*H`` elements, kept for backward),
  ``dispatch_footprint()`` gives the static sizes. Fine for the CPU/test and 1B configs (8-16 experts); at 671B
  scale without expert parallelism (E=256, K=8, 4096 tokens: b=32, 1272 blocks) the copies would be 56 G elements
  (>100 GB in bf16) - there the ``grouped_matmul`` dispatch (below: the same expert-sorted layout without blocks,
  Ascend's GroupedMatmul, one weight copy per expert instead of per block) is the right kernel.
* Block size: a power of two near ``N*K / (4E)`` clamped to [8, 128] (padding bound <= ~25% of the real rows,
  few weight copies); ``block_size=`` or ``cfg.moe_dispatch_block_size`` override it. Cost model: time ~
  rows + lambda * blocks, optimum ``b ~ sqrt(lambda * N*K / E)``; measured best b=128 at N*K/E=512.
* Measured (``benchmarks/bench_moe_dispatch.py``, GRAPH mode, 2 shared CPU cores, 8 experts top-2, hidden 256,
  moe_intermediate 512, 2048 tokens, routed part only): 4,992 expert rows vs 16,384 dense; block 128 ran
  forward 72 ms vs 182 ms dense and forward+backward 179 ms vs 458 ms (2.5x) in an earlier run with the machine
  quieter (load ~2); in the recorded run, under load ~8-10 (variants interleaved), 2.2-2.7x forward and
  2.3-2.7x forward+backward for blocks 64-256, and HF transformers' per-expert loop on PyTorch CPU took ~3x
  the dense time (results JSON). Compile time is about that of dense (~2-5 s for forward+backward of the block
  alone, more under load).

Which dispatch runs where (``moe_dispatch``)
--------------------------------------------
``cfg.moe_dispatch`` (read with ``getattr``; absent or None = by device, `default_moe_dispatch`) or the
``dispatch=`` argument selects the routed compute:

* ``"block_sparse"`` (default on CPU/GPU): the block layout above, BatchMatMul over gathered weights; runs on every
  backend, measured and tested here.
* ``"grouped_matmul"`` (default when ``device_target`` is Ascend): tokens permuted (stably sorted) by expert with
  no block padding, three calls of Ascend's grouped matmul (`ascend_grouped_matmul`: ``GroupedMatmul(split_item=3,
  group_type=0)`` from ``mindspore.ops.auto_generate``, x [M, H] with rows grouped by expert, weight [E, in, out],
  ``group_list`` int64 [E] = cumulative row ends), then unpermute-and-weight. **This path has never run on Ascend
  hardware**: MindSpore 2.10's CPU backend returns an empty tuple for GroupedMatmul, so selecting it on CPU without
  an injected kernel is a ConfigError. Everything around the kernel is plain MindSpore ops and is tested on CPU
  (PyNative and GRAPH, forward and gradients, against the block-sparse path and HF) with a reference grouped
  matmul injected through ``DeepseekV3MoE(cfg, grouped_matmul=fn)``; the reference reproduces the worked example
  of the kernel's documentation.

Grouped-matmul layout and cost: each expert's segment holds its tokens in token order plus one zero *guard row*,
so ``group_list = cumsum(counts + 1)`` is strictly increasing and no group is empty (see `expert_sorted_layout`);
rows = N*K + E. The kernel wants weights as one [E, in, out] tensor while the checkpoint has one [out, in]
Parameter per expert (``experts.{e}.gate_proj.weight`` ...): they are stacked and transposed at runtime, i.e.
one compute-dtype copy of the layer's expert weights per projection, kept for backward
(`grouped_matmul_footprint`). At 671B scale without expert parallelism that copy is 3*E*H*I = 11.3 G elements
(22.5 GB in bf16) per MoE layer, held from its forward to its backward - 5x less than the block-sparse per-block
copies (56 G), but over the 58 MoE layers (or a pipeline stage's share) far beyond a 64 GB device; the layer's
expert *parameters* alone are the same 11.3 G elements (45 GB in fp32), so 671B needs
expert parallelism (AlltoAll token exchange, E/ep experts per rank, e.g. ep=64: 4 experts, 0.35 GB of stacked bf16
weights per layer) whatever the kernel. Expert parallelism is out of scope of this module: every rank computes
all experts. With mixed precision the stack replaces the fp32 -> bf16 cast copy every layer makes anyway (whether
the compiler fuses cast + stack + transpose into one buffer is unmeasured). If that copy matters, the better scheme
is one stacked Parameter per projection in the kernel's layout (MindFormers' w1/w2/w3), split into/joined from the
per-expert HF names by the weight mapping at load/save; not done because parameter names are the project's
contract. ``GroupedMatmul(transpose_b=True)`` would skip the transpose, but the docs' note on which calls have a
backward does not mention the transpose flags and MindFormers calls the untransposed form, so that form is used.
The 2.10 docs of GroupedMatmul list float16/float32 inputs only (GroupedMatmulV4 and ``gmm`` list bfloat16 too, and
MindFormers runs GroupedMatmul in bfloat16): bfloat16 compute on this path is, like the rest of it, unverified.

Positions within an expert segment come from an exclusive cumulative sum over the one-hot assignment matrix
(``[N*K, E]``), not from a sort, so the layout is deterministic and needs no sort kernel.

Balance loss: the complementary sequence-wise loss of the report (eq. 17-20), computed per sequence and averaged;
``cfg.seq_balance_loss_alpha == 0`` skips it entirely.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.ops.auto_generate import GroupedMatmul

from mindpretrain.config import require
from research.deepseek3.deepseek3_config import MOE_DISPATCHES

_DTYPES = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}


def _dtype(cfg, name, default="float32"):
    value = getattr(cfg, name, None) or default
    if not isinstance(value, str):
        return value
    require(value in _DTYPES, name, value, f"must be one of {sorted(_DTYPES)}")
    return _DTYPES[value]


def _normal_parameter(shape, cfg):
    sigma = float(getattr(cfg, "initializer_range", 0.02))
    return Parameter(initializer(Normal(sigma=sigma), shape, _dtype(cfg, "param_init_type")), name="weight")


class Linear(nn.Cell):
    """Bias-free linear layer with an HF-shaped ``weight`` [out, in], computing in ``cfg.compute_dtype``."""

    def __init__(self, in_features, out_features, cfg):
        super().__init__()
        self.weight = _normal_parameter((out_features, in_features), cfg)
        self.compute_dtype = _dtype(cfg, "compute_dtype")

    def construct(self, x):
        weight = ops.cast(self.weight, self.compute_dtype)
        return ops.matmul(ops.cast(x, self.compute_dtype), weight.T)


class SwiGLUMLP(nn.Cell):
    """``down(silu(gate(x)) * up(x))``: the dense FFN, the shared experts and each routed expert."""

    def __init__(self, hidden_size, intermediate_size, cfg):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, cfg)
        self.up_proj = Linear(hidden_size, intermediate_size, cfg)
        self.down_proj = Linear(intermediate_size, hidden_size, cfg)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class TopkRouter(nn.Cell):
    """Sigmoid gate with group-limited top-k; the bias only steers selection (aux-loss-free balancing).

    Sizes (n_group divides the experts, >= 2 experts per group, k fits the kept groups) are validated once, by
    `DeepseekV3Config`, when the config is loaded.
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group or 1
        self.topk_group = cfg.topk_group or self.n_group
        self.norm_topk_prob = bool(cfg.norm_topk_prob)
        self.routed_scaling_factor = float(cfg.routed_scaling_factor)
        self.weight = _normal_parameter((self.num_experts, cfg.hidden_size), cfg)
        self.e_score_correction_bias = Parameter(Tensor(np.zeros(self.num_experts, np.float32)),
                                                 name="e_score_correction_bias", requires_grad=False)

    def construct(self, x):
        """x [N, H] -> (scores [N, E] fp32, topk_idx int32 [N, K], topk_weight fp32 [N, K])."""
        logits = ops.matmul(ops.cast(x, ms.float32), ops.cast(self.weight, ms.float32).T)
        scores = ops.sigmoid(logits)
        choice = scores + ops.stop_gradient(self.e_score_correction_bias)
        choice = ops.stop_gradient(choice)
        if self.topk_group < self.n_group:
            tokens = choice.shape[0]
            per_group = choice.reshape(tokens, self.n_group, self.num_experts // self.n_group)
            group_scores = ops.topk(per_group, 2, dim=-1)[0].sum(-1)
            group_idx = ops.topk(group_scores, self.topk_group, dim=-1)[1]
            group_mask = ops.one_hot(group_idx, self.n_group, Tensor(1.0, ms.float32),
                                     Tensor(0.0, ms.float32)).sum(1)
            expert_mask = ops.broadcast_to(group_mask.reshape(tokens, self.n_group, 1), per_group.shape)
            expert_mask = expert_mask.reshape(tokens, self.num_experts)
            choice = ops.where(expert_mask > 0.5, choice, ops.full_like(choice, float("-inf")))
        topk_idx = ops.topk(choice, self.top_k, dim=-1)[1]
        topk_idx = ops.cast(topk_idx, ms.int32)
        topk_weight = ops.gather_elements(scores, 1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdims=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        return scores, topk_idx, topk_weight


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


def default_moe_dispatch(device_target=None):
    """``grouped_matmul`` on Ascend (its kernel exists there only), ``block_sparse`` elsewhere (CPU, tests)."""
    device = str(device_target or ms.get_context("device_target")).upper()
    return "grouped_matmul" if device == "ASCEND" else "block_sparse"


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


class DeepseekV3MoE(nn.Cell):
    """Routed + shared experts. ``construct(hidden [B,S,H]) -> (out [B,S,H], load fp32 [E], balance_loss)``.

    ``dispatch`` (or ``cfg.moe_dispatch``; None = `default_moe_dispatch` for the current device) picks the routed
    compute: ``"block_sparse"`` or ``"grouped_matmul"``. ``grouped_matmul`` is the kernel function of the grouped
    path (default `ascend_grouped_matmul`; CPU tests pass a reference with the same signature).
    """

    def __init__(self, cfg, block_size=None, dispatch=None, grouped_matmul=None):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.hidden_size = cfg.hidden_size
        self.compute_dtype = _dtype(cfg, "compute_dtype")
        self.block_size = block_size or getattr(cfg, "moe_dispatch_block_size", None)
        self.dispatch = dispatch or getattr(cfg, "moe_dispatch", None) or default_moe_dispatch()
        require(self.dispatch in MOE_DISPATCHES, "moe_dispatch", self.dispatch, f"must be one of {MOE_DISPATCHES}")
        if self.dispatch == "grouped_matmul" and grouped_matmul is None:
            device = ms.get_context("device_target")
            require(str(device).upper() == "ASCEND", "moe_dispatch", self.dispatch,
                    f"needs Ascend's GroupedMatmul kernel, which MindSpore does not implement on device_target "
                    f"{device}: use block_sparse there")
            grouped_matmul = ascend_grouped_matmul
        self.grouped_matmul = grouped_matmul
        self.balance_alpha = float(getattr(cfg, "seq_balance_loss_alpha", 0.0) or 0.0)
        self.gate = TopkRouter(cfg)
        self.experts = nn.CellList([SwiGLUMLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg)
                                    for _ in range(self.num_experts)])
        self.batch_matmul_nt = ops.BatchMatMul(transpose_b=True)   # x @ W^T without materialising W^T
        self.shared_experts = None
        if cfg.n_shared_experts:
            self.shared_experts = SwiGLUMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg)

    def _stacked(self, which):
        """[E, out, in] view of one projection across experts (ops.stack passes gradients to each Parameter)."""
        weights = []
        for expert in self.experts:
            weights.append(getattr(expert, which).weight)
        return ops.cast(ops.stack(weights), self.compute_dtype)

    def construct(self, hidden):
        batch, seq, hidden_size = hidden.shape
        tokens = batch * seq
        x = hidden.reshape(tokens, hidden_size)
        scores, topk_idx, topk_weight = self.gate(x)

        selected = ops.one_hot(topk_idx.reshape(-1), self.num_experts, Tensor(1, ms.int32), Tensor(0, ms.int32))
        selected = ops.stop_gradient(selected)                                   # [N*K, E]
        counts = selected.sum(0)                                                 # [E]
        load = ops.stop_gradient(ops.cast(counts, ms.float32))

        routed = self._dispatch_compute_combine(x, selected, counts, topk_weight)
        out = routed.reshape(batch, seq, hidden_size)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)

        if self.balance_alpha > 0:
            balance_loss = self._sequence_balance_loss(scores.reshape(batch, seq, self.num_experts),
                                                       selected.reshape(batch, seq * self.top_k, self.num_experts))
        else:
            balance_loss = Tensor(0.0, ms.float32)
        return out, load, balance_loss

    def _dispatch_compute_combine(self, x, selected, counts, topk_weight):
        if self.dispatch == "grouped_matmul":
            return self._grouped_compute_combine(x, selected, counts, topk_weight)
        return self._block_compute_combine(x, selected, counts, topk_weight)

    def _grouped_compute_combine(self, x, selected, counts, topk_weight):
        """Permute tokens by expert, three grouped matmuls over [E, in, out] weights, unpermute and weight."""
        source, row_of, group_list = expert_sorted_layout(selected, counts, self.top_k)
        x_sorted = ops.gather(self._with_zero_row(x), source, 0)                # [N*K+E, H]
        gate = self.grouped_matmul(x_sorted, self._stacked_in_out("gate_proj"), group_list)
        up = self.grouped_matmul(x_sorted, self._stacked_in_out("up_proj"), group_list)
        y_sorted = self.grouped_matmul(ops.silu(gate) * up, self._stacked_in_out("down_proj"), group_list)
        return self._combine(y_sorted, row_of, topk_weight)

    def _stacked_in_out(self, which):
        """[E, in, out] (the kernel's x @ W layout) from the per-expert [out, in] Parameters: a runtime copy."""
        return ops.transpose(self._stacked(which), (0, 2, 1))

    def _with_zero_row(self, x):
        return ops.concat([ops.cast(x, self.compute_dtype), ops.zeros((1, x.shape[1]), self.compute_dtype)], axis=0)

    def _combine(self, y_rows, row_of, topk_weight):
        """Unpermute: each token sums its K rows, weighted by the router's (unbiased, scaled) weights."""
        tokens = topk_weight.shape[0]
        y_assign = ops.gather(y_rows, row_of, 0).reshape(tokens, self.top_k, y_rows.shape[1])
        weight = ops.cast(topk_weight, self.compute_dtype).reshape(tokens, self.top_k, 1)
        return (y_assign * weight).sum(1)

    def _block_compute_combine(self, x, selected, counts, topk_weight):
        tokens = x.shape[0]
        assignments = tokens * self.top_k
        block = self.block_size or default_block_size(assignments, self.num_experts)
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

        x_blocks = ops.gather(self._with_zero_row(x), source, 0).reshape(blocks, block, x.shape[1])

        gate_w = ops.gather(self._stacked("gate_proj"), block_expert, 0)       # [blocks, I, H]
        up_w = ops.gather(self._stacked("up_proj"), block_expert, 0)
        down_w = ops.gather(self._stacked("down_proj"), block_expert, 0)       # [blocks, H, I]
        h = ops.silu(self.batch_matmul_nt(x_blocks, gate_w)) * self.batch_matmul_nt(x_blocks, up_w)
        y_rows = self.batch_matmul_nt(h, down_w).reshape(rows, x.shape[1])
        return self._combine(y_rows, row_of, topk_weight)

    def _sequence_balance_loss(self, scores, selected):
        """alpha * mean_b sum_i f_i P_i with f_i = E/(K T) * #tokens choosing i, P_i = mean_t s_i / sum_j s_j."""
        seq = scores.shape[1]
        normalised = scores / scores.sum(-1, keepdims=True)
        p = normalised.mean(1)                                                   # [B, E]
        f = ops.cast(selected.sum(1), ms.float32) * (self.num_experts / (self.top_k * seq))
        return self.balance_alpha * (ops.stop_gradient(f) * p).sum(-1).mean()


def expert_bias_update(bias_np, load_np, rate):
    """Aux-loss-free balancing step: ``bias + rate * sign(mean(load) - load)`` (overloaded experts go down)."""
    bias = np.asarray(bias_np, dtype=np.float32)
    load = np.asarray(load_np, dtype=np.float32)
    return (bias + np.float32(rate) * np.sign(load.mean(-1, keepdims=True) - load)).astype(np.float32)
