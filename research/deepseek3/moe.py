"""DeepSeekMoE block: sigmoid router with aux-loss-free bias, group-limited top-k, block-sparse dropless dispatch.

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
  (>100 GB in bf16) - there a grouped matmul over the
  same expert-sorted layout (block 1: no padding, no copies; Ascend's GroupedMatmul, which returns nothing on CPU
  in MindSpore 2.10) is the right kernel.
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

Positions within an expert segment come from an exclusive cumulative sum over the one-hot assignment matrix
(``[N*K, E]``), not from a sort, so the layout is deterministic and needs no sort kernel.

Balance loss: the complementary sequence-wise loss of the report (eq. 17-20), computed per sequence and averaged;
``cfg.seq_balance_loss_alpha == 0`` skips it entirely.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindpretrain.config import require

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


class DeepseekV3MoE(nn.Cell):
    """Routed + shared experts. ``construct(hidden [B,S,H]) -> (out [B,S,H], load fp32 [E], balance_loss)``."""

    def __init__(self, cfg, block_size=None):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.hidden_size = cfg.hidden_size
        self.compute_dtype = _dtype(cfg, "compute_dtype")
        self.block_size = block_size or getattr(cfg, "moe_dispatch_block_size", None)
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
        tokens = x.shape[0]
        assignments = tokens * self.top_k
        block = self.block_size or default_block_size(assignments, self.num_experts)
        blocks = num_dispatch_blocks(tokens, self.top_k, self.num_experts, block)
        rows = blocks * block

        # Layout: expert e's rows start at padded_start[e]; an assignment's row = start + rank among e's assignments.
        padded = (counts + (block - 1)) // block * block                         # [E]
        padded_end = ops.cumsum(padded, 0)
        padded_start = padded_end - padded
        rank = ops.cumsum(selected, 0) - selected                                # exclusive rank, [N*K, E]
        row_of = ((rank + padded_start.reshape(1, -1)) * selected).sum(1)        # [N*K]

        # Inverse map row -> source token (tokens index `tokens` = an appended zero row for padding).
        source = ops.full((rows,), tokens, dtype=ms.int32)
        assignment_token = ops.arange(0, assignments, dtype=ms.int32) // self.top_k
        source = ops.tensor_scatter_elements(source, row_of, assignment_token, axis=0)
        source = ops.stop_gradient(source)

        # Block b belongs to the expert whose padded segment covers row b*block (tail blocks: last expert, zeros).
        block_first_row = ops.arange(0, blocks, dtype=ms.int32).reshape(-1, 1) * block
        block_expert = (block_first_row >= padded_end.reshape(1, -1)).astype(ms.int32).sum(1)
        block_expert = ops.stop_gradient(ops.minimum(block_expert, self.num_experts - 1))

        x_padded = ops.concat([ops.cast(x, self.compute_dtype),
                               ops.zeros((1, x.shape[1]), self.compute_dtype)], axis=0)
        x_blocks = ops.gather(x_padded, source, 0).reshape(blocks, block, x.shape[1])

        gate_w = ops.gather(self._stacked("gate_proj"), block_expert, 0)       # [blocks, I, H]
        up_w = ops.gather(self._stacked("up_proj"), block_expert, 0)
        down_w = ops.gather(self._stacked("down_proj"), block_expert, 0)       # [blocks, H, I]
        h = ops.silu(self.batch_matmul_nt(x_blocks, gate_w)) * self.batch_matmul_nt(x_blocks, up_w)
        y_rows = self.batch_matmul_nt(h, down_w).reshape(rows, x.shape[1])

        y_assign = ops.gather(y_rows, row_of, 0).reshape(tokens, self.top_k, x.shape[1])
        weight = ops.cast(topk_weight, self.compute_dtype).reshape(tokens, self.top_k, 1)
        return (y_assign * weight).sum(1)

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
