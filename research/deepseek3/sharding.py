"""DeepSeek-V3's shard table: how each weight is split and which `.shard()` layout each op kind assumes.

The core (`mindpretrain.parallel.layouts`, `mindpretrain.parallel.strategies`) knows the mesh symbols and the
arithmetic; this plugin file knows DeepSeek-V3's parameter names and op kinds. The model spec
(`research/deepseek3/spec.py`) hands both tables to the core.
"""

_LAYER = r"model\.layers\.(?P<layer>\d+)\."

# (kind, regex on the full parameter name, split axis per dimension, routed expert?)
WEIGHT_KINDS = (
    ("embedding", r"(model\.embed_tokens|" + _LAYER + r"embed_tokens)\.weight", ("vocab", None), False),
    ("lm_head", r"(lm_head|" + _LAYER + r"shared_head\.head)\.weight", ("vocab", None), False),
    ("final_norm", r"model\.norm\.weight", (None,), False),
    ("norm", _LAYER + r"(input_layernorm|post_attention_layernorm|enorm|hnorm|shared_head\.norm)\.weight",
     (None,), False),
    ("attention.q_a_proj", _LAYER + r"self_attn\.q_a_proj\.weight", (None, None), False),
    ("attention.q_a_layernorm", _LAYER + r"self_attn\.q_a_layernorm\.weight", (None,), False),
    ("attention.q_b_proj", _LAYER + r"self_attn\.q_b_proj\.weight", ("mp", None), False),
    ("attention.q_proj", _LAYER + r"self_attn\.q_proj\.weight", ("mp", None), False),
    ("attention.kv_a_proj", _LAYER + r"self_attn\.kv_a_proj_with_mqa\.weight", (None, None), False),
    ("attention.kv_a_layernorm", _LAYER + r"self_attn\.kv_a_layernorm\.weight", (None,), False),
    ("attention.kv_b_proj", _LAYER + r"self_attn\.kv_b_proj\.weight", ("mp", None), False),
    ("attention.o_proj", _LAYER + r"self_attn\.o_proj\.weight", (None, "mp"), False),
    ("mlp.gate_proj", _LAYER + r"mlp\.gate_proj\.weight", ("mp", None), False),
    ("mlp.up_proj", _LAYER + r"mlp\.up_proj\.weight", ("mp", None), False),
    ("mlp.down_proj", _LAYER + r"mlp\.down_proj\.weight", (None, "mp"), False),
    ("moe.router", _LAYER + r"mlp\.gate\.weight", (None, None), False),
    ("moe.router_bias", _LAYER + r"mlp\.gate\.e_score_correction_bias", (None,), False),
    ("moe.shared_gate_proj", _LAYER + r"mlp\.shared_experts\.gate_proj\.weight", ("mp", None), False),
    ("moe.shared_up_proj", _LAYER + r"mlp\.shared_experts\.up_proj\.weight", ("mp", None), False),
    ("moe.shared_down_proj", _LAYER + r"mlp\.shared_experts\.down_proj\.weight", (None, "mp"), False),
    ("moe.expert_gate_proj", _LAYER + r"mlp\.experts\.\d+\.gate_proj\.weight", ("emp", None), True),
    ("moe.expert_up_proj", _LAYER + r"mlp\.experts\.\d+\.up_proj\.weight", ("emp", None), True),
    ("moe.expert_down_proj", _LAYER + r"mlp\.experts\.\d+\.down_proj\.weight", (None, "emp"), True),
    ("mtp.eh_proj", _LAYER + r"eh_proj\.weight", (None, None), False),
)

def _rms_norm_symbols(kind, activation):
    """The primitives of one RMSNorm on `activation` (3-D): square, mean, +eps, rsqrt, x * rsqrt, weight * x.
    `kind` itself names the final weight multiply."""
    statistic = activation[:-1] + (None,)             # [B, S, 1]
    return {f"{kind}.square": (activation,), f"{kind}.mean": (activation,), f"{kind}.eps_add": (statistic, ()),
            f"{kind}.rsqrt": (statistic,), f"{kind}.normalise": (activation, statistic),
            kind: (activation, (None,))}


# Tensor layouts assumed: attention tensors [B, N(heads), S, D]; hidden states [B, S, H];
# token-major matrices [T = B*S, features]; routed-expert blocks [blocks, b (rows per block), features].
OP_SYMBOLS = {
    # --- multi-head latent attention core -----------------------------------------------------------------
    "attention.rope_mul": (("dp", "mp", None, None), (None, None, None, None)),     # q_pe * cos/sin
    "attention.k_rope_mul": (("dp", None, None, None), (None, None, None, None)),   # shared k_pe (1 head)
    "attention.k_pe_broadcast": (("dp", None, None, None),),                         # k_pe -> every head
    "attention.qk_concat": (("dp", "mp", None, None), ("dp", "mp", None, None)),     # [q_nope | q_pe]
    "attention.qk_bmm": (("dp", "mp", None, None), ("dp", "mp", None, None)),        # Q K^T
    "attention.scale_mul": (("dp", "mp", None, None), ()),
    "attention.mask_add": (("dp", "mp", None, None), (None, None, None, None)),     # mask [1, 1, S, S]
    "attention.softmax": (("dp", "mp", None, None),),
    "attention.pv_bmm": (("dp", "mp", None, None), ("dp", "mp", None, None)),        # P V
    # Flash-attention core (Ascend, use_flash_attention; research/deepseek3/flash_attention.py), TND layout as
    # MindFormers shards it without context parallel: tokens T = B*S over dp (whole rows per rank), heads over
    # mp; the compressed 2048 x 2048 causal mask replicated; actual_seq_qlen/kvlen [B*K] over dp with the rows.
    "attention.flash_attention": (("dp", "mp", None), ("dp", "mp", None), ("dp", "mp", None), (None, None),
                                  ("dp",), ("dp",)),
    "attention.value_pad": (("dp", "mp", None), ("dp", "mp", None)),                # [v | zeros] to q's head dim
    **_rms_norm_symbols("attention.latent_norm", ("dp", None, None)),               # RMSNorm of q/kv latents
    # --- block-level --------------------------------------------------------------------------------------
    **_rms_norm_symbols("norm", ("dp", "sp", None)),                                # RMSNorm [B,S,H]
    "residual_add": (("dp", "sp", None), ("dp", "sp", None)),
    "mlp.silu": (("dp", "mp"),),                                                     # sigmoid(g), g [T, I]
    "mlp.silu_mul": (("dp", "mp"), ("dp", "mp")),                                    # g * sigmoid(g)
    "mlp.swiglu_mul": (("dp", "mp"), ("dp", "mp")),
    # --- MoE (research/deepseek3/moe.py) ------------------------------------------------------------------
    # Router on tokens [T, E]; its matmul x [T, H] @ gate.weight^T is the projection kind `moe.router`.
    "moe.router_sigmoid": (("dp", None),),
    "moe.router_bias_add": (("dp", None), (None,)),                                  # scores + bias [E]
    "moe.group_top2": (("dp", None, None),),                                         # per group [T, G, E/G]
    "moe.group_topk": (("dp", None),),                                               # group scores [T, G]
    "moe.topk": (("dp", None),),                                                     # biased scores [T, E]
    # Routed experts, block_sparse dispatch: the rows of every expert are padded to blocks of b rows that each
    # belong to one expert, and each projection is ONE batch matmul over the blocks with the block's expert
    # weights gathered: x [blocks, b, H] x W [blocks, I, H]^T (down: h [blocks, b, I] x W [blocks, H, I]^T).
    # The split: the rows inside each block over dp, the expert FFN width I over emp (as WEIGHT_KINDS splits
    # the expert weights); blocks stay whole. Splitting the blocks over ep would not be expert parallelism:
    # every block gathers its expert's weights from the stack of all experts, so each device would still need
    # every expert; expert parallelism is the capacity dispatch below. dp must divide the block size (a power
    # of two in [8, 128] by default). The grouped_matmul dispatch declares no routed-expert kind (its kernel
    # is left to sharding propagation).
    "moe.expert_gate_proj": ((None, "dp", None), (None, "emp", None)),
    "moe.expert_up_proj": ((None, "dp", None), (None, "emp", None)),
    "moe.expert_silu": ((None, "dp", "emp"),),                                       # SiLU(gate) [blocks, b, I]
    "moe.expert_swiglu_mul": ((None, "dp", "emp"), (None, "dp", "emp")),
    "moe.expert_down_proj": ((None, "dp", "emp"), (None, None, "emp")),              # contracts the split I
    "moe.combine_mul": (("dp", None, None), ("dp", None, None)),                     # y [T,K,H] * w [T,K,1]
    # Routed experts, capacity dispatch (research/deepseek3/capacity_dispatch.py), MindFormers' expert
    # parallelism: tokens as dp shards of n, per shard C slots per expert. Token side [dp, ...] over dp: slots
    # from a k-major one-hot [dp, K*n, E] (cumsum over assignments), then by index, no [n, E, C] mask: each
    # (token, k)'s slot e*C + slot (E*C when dropped), the token of each slot scattered into [dp, E*C + 1]
    # (the last, spill, slot sliced off), dispatch Gather(batch_dims=1) [x | 0] [dp, n+1, H] by [dp, E*C], combine
    # Gather [y | 0] [dp, E*C+1, H] by [dp, n*K], times the router weight, summed over K. Expert side
    # [E, dp*C, ...]: E over ep, the rows over dp_ep (= dp / ep), the width I over emp, the weights [E, out, in]
    # over ep like the rows. The transposes between the two sides carry the layout change, where MindSpore
    # inserts the AlltoAll inside each expert-parallel group (enable_alltoall).
    "moe.capacity_k_major": (("dp", None, None),),                                   # [dp, n, K] <-> [dp, K, n]
    "moe.capacity_assignment_onehot": (("dp", None, None), (), ()),                  # out [dp, K*n, E]
    "moe.capacity_slot_cumsum": (("dp", None, None),),                               # along K*n
    "moe.capacity_slot_mul": (("dp", None, None), ("dp", None, None)),
    "moe.capacity_slot_sum": (("dp", None, None),),                                  # over E -> [dp, K*n]
    "moe.capacity_keep_less": (("dp", None, None), ()),                              # slot [dp, n, K] < C
    "moe.capacity_expert_offset": (("dp", None, None), ()),                          # expert [dp, n, K] * C
    "moe.capacity_slot_position": (("dp", None, None), ("dp", None, None)),          # + slot
    "moe.capacity_spill_select": (("dp", None, None),) * 3,                          # kept ? e*C+slot : E*C
    "moe.capacity_token_ids": (("dp", None, None),),                                 # ones, cumsum along n
    "moe.capacity_slot_scatter": (("dp", None), ("dp", None), ("dp", None)),         # [dp,E*C+1] <- [dp,n*K]
    "moe.capacity_slot_slice": (("dp", None),),                                      # -> slot_token [dp, E*C]
    "moe.capacity_zero_row": (("dp", None, None), ("dp", None, None)),               # [rows | 0] along axis 1
    "moe.capacity_dispatch": (("dp", None, None), ("dp", None)),                     # [dp,n+1,H] by [dp,E*C]
    "moe.capacity_to_experts": (("dp_ep", "ep", None, None),),                       # [dp,E,C,H] -> [E,dp,C,H]
    # the stacked expert Parameters [E, I, H] / [E, H, I] (capacity and exchanged dispatches) are read through a
    # Cast split like the experts' weight input, so each device stores E/ep experts (moe.StackedRoutedExperts)
    "moe.stacked_gate_weight": (("ep", "emp", None),),
    "moe.stacked_up_weight": (("ep", "emp", None),),
    "moe.stacked_down_weight": (("ep", None, "emp"),),
    "moe.capacity_gate_proj": (("ep", "dp_ep", None), ("ep", "emp", None)),         # [E,dp*C,H] x [E,I,H]^T
    "moe.capacity_up_proj": (("ep", "dp_ep", None), ("ep", "emp", None)),
    "moe.capacity_silu": (("ep", "dp_ep", "emp"),),
    "moe.capacity_swiglu_mul": (("ep", "dp_ep", "emp"), ("ep", "dp_ep", "emp")),
    "moe.capacity_down_proj": (("ep", "dp_ep", "emp"), ("ep", None, "emp")),        # contracts the split I
    "moe.capacity_from_experts": (("ep", "dp_ep", None, None),),                     # [E,dp,C,H] -> [dp,E,C,H]
    "moe.capacity_combine": (("dp", None, None), ("dp", None)),                      # [dp,E*C+1,H] by [dp,n*K]
    "moe.capacity_weight_mul": (("dp", None, None, None), ("dp", None, None, None)),  # [dp,n,K,H] * [dp,n,K,1]
    "moe.capacity_combine_sum": (("dp", None, None, None),),                         # over K -> [dp, n, H]
    # Shared experts: the SwiGLU of layers.py on tokens [T, I] (projections: kinds moe.shared_*_proj).
    "moe.shared_silu": (("dp", "mp"),),                                              # sigmoid(g)
    "moe.shared_silu_mul": (("dp", "mp"), ("dp", "mp")),                             # g * sigmoid(g)
    "moe.shared_swiglu_mul": (("dp", "mp"), ("dp", "mp")),
    # --- embedding, MTP, head, loss -----------------------------------------------------------------------
    "embedding.gather": (("vocab", None), ("dp", None)),                             # table [V,H], ids [B,S]
    "mtp.concat": (("dp", None, None), ("dp", None, None)),                          # [enorm(e) | hnorm(h)]
    # The softmax axis cannot be split, so the loss gathers the vocab-split logits of the head per chunk of
    # tokens (research/deepseek3/head.py); a decomposed max/exp/sum softmax would keep them split.
    "loss.log_softmax": (("dp", None),),                                             # logits [T, V]
    "loss.nll_gather": (("dp", None), ("dp", None)),                                 # log p [T,V], labels [T,1]
}

# Projections: op kind == weight kind; x [T, in] @ W[out, in]^T.
# Ops sharded by a device-matrix layout (mindspore.parallel.Layout) instead of per-input cut counts: the mesh
# as (axis name, size symbol) from slowest to fastest, then each input's and output's axis name per dimension
# (a tuple of names splits one dimension over several axes, None leaves it whole).
#   moe.exchanged_experts: the dropless expert-parallel Morph (exchanged_experts.py, MindFormers' MoEV3 layout).
#   The dp x mp devices of a stage are (replica, ep) with ep fastest: the token shards [dp*mp, n, ...] over
#   both, one per device; the stacked experts [E, out, in] over ep, replicated over the dp*mp/ep replicas (whose
#   gradients MindSpore then reduces). Each device exchanges with the ep devices of its replica.
_TOKEN_SHARD = (("replica", "ep"), None, None)
_EXPERT_SLICE = ("ep", None, None)
LAYOUT_OPS = {
    "moe.exchanged_experts": ((("replica", "dp*mp/ep"), ("ep", "ep")),
                              (_TOKEN_SHARD,) * 3 + (_EXPERT_SLICE,) * 3, (_TOKEN_SHARD,)),
}

MATMUL_OPS = ("attention.q_a_proj", "attention.q_b_proj", "attention.q_proj", "attention.kv_a_proj",
              "attention.kv_b_proj", "attention.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
              "moe.router", "moe.shared_gate_proj", "moe.shared_up_proj", "moe.shared_down_proj",
              "mtp.eh_proj", "lm_head")

OP_KINDS = tuple(OP_SYMBOLS) + tuple(LAYOUT_OPS) + MATMUL_OPS

