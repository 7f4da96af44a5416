"""DeepSeek-V3 weights as MindSpore Transformers (MindFormers) saves them, read as our (= HuggingFace) tensors.

A MindFormers user continues a run here from the checkpoint MindFormers wrote, so the loader and the converter
accept its names (MindFormers' `research/deepseek3/convert_weight.py` writes them from HF, `convert_reversed.py`
reads them back). What differs from HF, per decoder layer `model.layers.{l}` (MTP layers included):

- renamed: `attention_norm`, `ffn_norm`, `attention.q2l_proj` (q_a_proj), `attention.lq_norm`, `attention.lkv_norm`,
  `attention.wo` (o_proj), `feed_forward.w1/w2/w3` (gate/down/up, dense and shared experts), the router
  `feed_forward.routed_experts.router.dense` or `.router_dense`, its bias `...router.router.topk_bias` or
  `...routed_experts.topk_bias`; `model.tok_embeddings.embedding_weight`, `model.norm_out.weight`;
- split per head: q_b_proj into `l2q_nope_proj` + `l2q_pe_proj`, kv_b_proj into `lkv2kv_k_nope` + `lkv2kv_v`;
  kv_a_proj_with_mqa into `kv2l_latent_kv` + `kv2l_k_pe`. MindFormers' rotary embedding rotates halves, HF's
  interleaved pairs, so each head's rope rows are stored evens first, then odds (undone here);
- routed experts stacked: `feed_forward.routed_experts.ffn.w1/w2/w3.weight` [E, out, in] (batched matmul), or
  [E, in, out] (grouped matmul, told apart by shape; a square expert reads as [E, out, in], convert_weight.py's
  default), or `ffn.w1/w2/w3` [E, in, out] without `.weight` (MoEV3), or `ffn.w1` [E, H, 2I] with gate and up
  fused and no `ffn.w3`;
- MTP module i: `model.mtp_hidden_fusers.{i}.norm_emb` (enorm), `.norm` (hnorm), `.dense` (eh_proj),
  `model.mtp_norms.{i}` (shared_head.norm); MindFormers stores no copy of embedding and head.

Optimizer state (`adam_m.`, `adam_v.`, ...), step counters and expert-load buffers are skipped: only weights load.
"""
import functools
import re

import numpy as np

from mindpretrain.model_spec import DerivedTensor, WeightLayout
from research.deepseek3.weight_mapping import hf_parameter_shapes

_MARKERS = ("tok_embeddings.", ".attention_norm.", ".ffn_norm.", ".attention.q2l_proj.", ".attention.kv2l",
            ".attention.lkv2kv", ".attention.l2q_", ".attention.wo.", ".feed_forward.", "mtp_hidden_fusers.",
            "mtp_norms.", "model.norm_out.")
IGNORED_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "optimizer.", "exp_avg.", "exp_avg_sq.")
IGNORED_NAMES = ("global_step", "current_iterator_step", "last_overflow_iterator_step", "epoch_num", "step_num",
                 "loss_scale", "scale_sense", "learning_rate")
IGNORED_SUFFIXES = ("expert_load",)
_RENAMED = (("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_a_proj", "attention.q2l_proj"), ("self_attn.q_a_layernorm", "attention.lq_norm"),
            ("self_attn.kv_a_layernorm", "attention.lkv_norm"), ("self_attn.o_proj", "attention.wo"),
            ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"),
            ("mlp.up_proj", "feed_forward.w3"), ("mlp.shared_experts.gate_proj", "feed_forward.shared_experts.w1"),
            ("mlp.shared_experts.down_proj", "feed_forward.shared_experts.w2"),
            ("mlp.shared_experts.up_proj", "feed_forward.shared_experts.w3"))
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_MF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_STACKED = {"gate": "w1", "down": "w2", "up": "w3"}


def is_mindformers_layout(names):
    """One MindFormers-only name is enough: HF names never contain these parts."""
    return any(marker in name for name in names for marker in _MARKERS)


def is_mtp_name(model_config, name):
    match = _MF_LAYER.match(name)
    return name.startswith(("model.mtp_hidden_fusers.", "model.mtp_norms.")) or bool(
        match and int(match.group(1)) >= model_config.num_hidden_layers)


def is_ignored(name):
    return name.startswith(IGNORED_PREFIXES) or name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES)


# --- rearrangements (pure indexing, so any stored dtype goes through bit for bit) ------------------------------

def _same(array):
    return array


def _interleave_rope(rows, heads):
    """Each head's rope rows from MindFormers' [evens, odds] back to HF's interleaved pairs."""
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, 2, per_head // 2, -1).transpose(0, 2, 1, 3).reshape(rows.shape[0], -1)


def _per_head_concat(first, second, heads, interleave_second=False):
    if interleave_second:
        second = _interleave_rope(second, heads)
    merged = np.concatenate([first.reshape(heads, -1, first.shape[-1]), second.reshape(heads, -1, second.shape[-1])],
                            axis=1)
    return np.ascontiguousarray(merged.reshape(-1, first.shape[-1]))


def _kv_a(latent, k_pe):
    return np.ascontiguousarray(np.concatenate([latent, _interleave_rope(k_pe, 1)], axis=0))


def _expert(stacked, index, transpose):
    one = stacked[index]
    return np.ascontiguousarray(one.T if transpose else one)


def _fused_expert(fused, index, half, experts):
    """gate (half 0) or up (half 1) of expert `index` from `ffn.w1` [E, H, 2I] (or [E*H, 2I])."""
    one = fused.reshape(experts, -1, fused.shape[-1])[index]
    width = one.shape[-1] // 2
    return np.ascontiguousarray(one[:, half * width:(half + 1) * width].T)


# --- the recipes: per native tensor, the MindFormers alternatives that may hold it --------------------------

def _candidates(model_config, name, shape):
    """[(sources {mf name: shape}, derive)] in order of preference for native tensor `name` of `shape`."""
    heads = model_config.num_attention_heads
    nope, rope, v_dim = model_config.qk_nope_head_dim, model_config.qk_rope_head_dim, model_config.v_head_dim
    expert = _EXPERT.match(name)
    if expert:
        return _expert_candidates(model_config, int(expert.group(1)), int(expert.group(2)), expert.group(3), shape)
    top = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
           "model.norm.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}
    if name in top:
        return [({top[name]: shape}, _same)]
    layered = _LAYER_NAME.match(name)
    if layered is None:
        return _bias_candidates(name, shape)
    layer, rest = layered.groups()
    prefix = f"model.layers.{layer}."
    if rest == "self_attn.q_b_proj":
        return [({prefix + "attention.l2q_nope_proj.weight": (heads * nope, shape[1]),
                  prefix + "attention.l2q_pe_proj.weight": (heads * rope, shape[1])},
                 functools.partial(_per_head_concat, heads=heads, interleave_second=True))]
    if rest == "self_attn.kv_a_proj_with_mqa":
        return [({prefix + "attention.kv2l_latent_kv.weight": (model_config.kv_lora_rank, shape[1]),
                  prefix + "attention.kv2l_k_pe.weight": (rope, shape[1])}, _kv_a)]
    if rest == "self_attn.kv_b_proj":
        return [({prefix + "attention.lkv2kv_k_nope.weight": (heads * nope, shape[1]),
                  prefix + "attention.lkv2kv_v.weight": (heads * v_dim, shape[1])},
                 functools.partial(_per_head_concat, heads=heads))]
    if rest == "mlp.gate":
        return [({prefix + "feed_forward.routed_experts.router.dense.weight": shape}, _same),
                ({prefix + "feed_forward.routed_experts.router_dense.weight": shape}, _same)]
    return _renamed_candidates(model_config, int(layer), rest, shape)


def _renamed_candidates(model_config, layer, rest, shape):
    mtp = {"enorm": "norm_emb", "hnorm": "norm", "eh_proj": "dense"}
    depth = layer - model_config.num_hidden_layers
    if rest in mtp:
        return [({f"model.mtp_hidden_fusers.{depth}.{mtp[rest]}.weight": shape}, _same)]
    if rest == "shared_head.norm":
        return [({f"model.mtp_norms.{depth}.weight": shape}, _same)]
    for ours, theirs in _RENAMED:
        if rest == ours:
            return [({f"model.layers.{layer}.{theirs}.weight": shape}, _same)]
    return []


def _bias_candidates(name, shape):
    match = re.match(r"^(model\.layers\.\d+\.)mlp\.gate\.e_score_correction_bias$", name)
    if not match:
        return []
    prefix = match.group(1) + "feed_forward.routed_experts."
    return [({prefix + "router.router.topk_bias": shape}, _same), ({prefix + "topk_bias": shape}, _same)]


def _expert_candidates(model_config, layer, index, kind, shape):
    experts, base = model_config.n_routed_experts, f"model.layers.{layer}.feed_forward.routed_experts.ffn."
    out, inner = shape
    stacked = base + _STACKED[kind]
    as_stored = functools.partial(_expert, index=index, transpose=False)
    transposed = functools.partial(_expert, index=index, transpose=True)
    candidates = [({stacked + ".weight": (experts, out, inner)}, as_stored),
                  ({stacked + ".weight": (experts, inner, out)}, transposed),
                  ({stacked: (experts, inner, out)}, transposed)]
    if kind in ("gate", "up"):
        candidates.append(({base + "w1": (experts, inner, 2 * out)},
                           functools.partial(_fused_expert, index=index, half=int(kind == "up"), experts=experts)))
    return candidates


def _choose(candidates, found):
    """(sources, derive) of the first candidate stored with the right shapes, else (None, problem or None)."""
    present = None
    for sources, derive in candidates:
        if all(source in found for source in sources):
            if all(tuple(found[source]) == tuple(want) for source, want in sources.items()):
                return sources, derive
            present = present or sources
    if present is None:
        return None, None
    return None, "; ".join(f"{source}: {list(found[source])} in the checkpoint, {list(want)} expected"
                           for source, want in present.items() if tuple(found[source]) != tuple(want))


def translate(model_config, found):
    """(derived {native name: DerivedTensor}, unconsumed MindFormers names, wrong-shape problems) for a checkpoint
    whose tensors are `found` {name: shape}."""
    derived, problems, consumed = {}, [], set()
    for name, shape in hf_parameter_shapes(model_config).items():
        sources, derive = _choose(_candidates(model_config, name, shape), found)
        if sources is None:
            if derive:
                problems.append(derive)
            continue
        derived[name] = DerivedTensor(tuple(sources), derive, tuple(shape))
        consumed.update(sources)
    unconsumed = [name for name in found if name not in consumed and not is_ignored(name)]
    return derived, unconsumed, sorted(set(problems))


MINDFORMERS_LAYOUT = WeightLayout(name="MindFormers", detect=is_mindformers_layout, translate=translate,
                                  is_mtp=is_mtp_name)
