"""A KV-cached decoder for `DeepseekV3ForCausalLM`: MLA's compressed latent is what the cache holds.

Cache, per layer and row, for every position up to `max_length` (allocated once, so shapes never change):
    latent  [max_length, kv_lora_rank]     c = kv_a_layernorm(first kv_lora_rank outputs of kv_a_proj_with_mqa)
    k_rope  [max_length, qk_rope_head_dim] the shared RoPE key, already rotated at its position
i.e. (kv_lora_rank + qk_rope_head_dim) x dtype bytes per token per layer: (512 + 64) x 2 = 1152 bytes in bf16 for
DeepSeek-V3, against 128 heads x (192 + 128) x 2 = 81920 bytes for expanded per-head K and V.

Attention reads the latent directly, in the absorbed form (DeepSeek-V2 sec. 2.1.3). With kv_b_proj split per
head n into W_UK[n] [nope, C] and W_UV[n] [v, C]:
    q_nope . k_nope[t] = (q_nope W_UK[n]) . c[t]          score   = (q_abs . c[t] + q_rope . k_rope[t]) * scale
    sum_t p_t v[t]     = W_UV[n] (sum_t p_t c[t])         context = W_UV[n] (p . c)
Why absorbed: expanding K/V from the cache costs T x C x N x (nope + v) multiply-adds per layer at every decode
step (all T cached tokens, again and again) or memory N x (nope + v) per token if kept; absorbed, a step costs
N x C x (nope + v) for the query and output whatever T is, and the T-long part reads C + R numbers per cached
token, shared by all heads (one matmul over heads folded into the query axis). Prefill uses the same code, so a
prompt is written and attended in one call; for long prompts this is dearer per score than the expanded form
(C + R = 576 against nope + R = 192 for DeepSeek-V3), a trade taken for one code path.

Rows are left-padded: row b's prompt fills cache slots [pad_b, P), slot s holds position s - pad_b (position 0
at the first real token), and an additive -1e9 mask hides the pad slots and every slot after the query. Each call
takes the new tokens' slots as a tensor and writes the cache through a one-hot blend, so the prefill and the step
each have one static shape and can be compiled (GRAPH mode) once. MTP layers are not run.
"""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.validation import require
from research.deepseek3.layers import ms_dtype
from research.deepseek3.mla import MASK_VALUE
from research.deepseek3.rope import apply_rotary, softmax_scale


def cache_bytes_per_token(model_config):
    """Bytes the cache holds per token, summed over the main layers."""
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[model_config.compute_dtype]
    return (model_config.kv_lora_rank + model_config.qk_rope_head_dim) * itemsize * model_config.num_hidden_layers


def _write(cache, new, slot_hot):
    """cache [B, T, D] with rows `slot_hot` [S, T] (one-hot) replaced by new [B, S, D]; exact (x*1 + 0)."""
    batch, seq, dim = new.shape
    slot_hot = ops.cast(slot_hot, new.dtype)
    written = ops.matmul(slot_hot.transpose(1, 0), new.transpose(1, 0, 2).reshape(seq, batch * dim))
    written = written.reshape(-1, batch, dim).transpose(1, 0, 2)                       # [B, T, D]
    keep = (1 - slot_hot.sum(0)).reshape(1, -1, 1)
    return cache * keep + written


class AbsorbedAttention(nn.Cell):
    """MLA over the latent cache for one layer's attention cell (its Parameters, read as they are)."""

    def __init__(self, attention, model_config):
        super().__init__(auto_prefix=False)
        self.attention = attention
        self.heads = model_config.num_attention_heads
        self.nope, self.rope, self.v_dim = (model_config.qk_nope_head_dim, model_config.qk_rope_head_dim,
                                            model_config.v_head_dim)
        self.rank = model_config.kv_lora_rank
        self.interleave = bool(model_config.rope_interleave)
        self.scale = float(softmax_scale(model_config))
        self.compute_dtype = ms_dtype(model_config.compute_dtype)
        self.softmax_dtype = ms_dtype(model_config.softmax_compute_type)
        self.bmm = ops.BatchMatMul()
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)

    def _query(self, x, cos, sin):
        """-> (q_nope [B, S, N, nope], rotated q_rope [B, S, N, R])."""
        attn = self.attention
        query = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))) if attn.use_q_lora else attn.q_proj(x)
        batch, seq, _ = x.shape
        query = query.reshape(batch, seq, self.heads, self.nope + self.rope)
        q_rope = apply_rotary(query[..., self.nope:], cos.expand_dims(2), sin.expand_dims(2), self.interleave)
        return query[..., :self.nope], q_rope

    def _per_head(self, x, weight):
        """x [B, S, N, D] times per-head weight [N, D, E] -> [B, N, S, E]."""
        batch, seq, heads, dim = x.shape
        out = self.bmm(x.transpose(2, 0, 1, 3).reshape(heads, batch * seq, dim), weight)
        return out.reshape(heads, batch, seq, -1).transpose(1, 0, 2, 3)

    def construct(self, x, cos, sin, mask, slot_hot, latent_cache, rope_cache):
        """x [B, S, H], cos/sin [B, S, R/2], mask [B, 1, S, T], slot_hot [S, T] -> (out [B, S, H], caches)."""
        attn = self.attention
        batch, seq, _ = x.shape
        q_nope, q_rope = self._query(x, cos, sin)
        compressed = attn.kv_a_proj_with_mqa(x)
        latent = attn.kv_a_layernorm(compressed[..., :self.rank])
        k_rope = apply_rotary(compressed[..., self.rank:], cos, sin, self.interleave)
        latent_cache = _write(latent_cache, ops.cast(latent, latent_cache.dtype), slot_hot)
        rope_cache = _write(rope_cache, ops.cast(k_rope, rope_cache.dtype), slot_hot)

        kv_weight = ops.cast(attn.kv_b_proj.weight, self.compute_dtype).reshape(self.heads, self.nope + self.v_dim,
                                                                                self.rank)
        q_absorbed = self._per_head(q_nope, kv_weight[:, :self.nope])                 # [B, N, S, C]
        q_rope = q_rope.transpose(0, 2, 1, 3).reshape(batch, self.heads * seq, self.rope)
        scores = self.bmm_nt(q_absorbed.reshape(batch, self.heads * seq, self.rank), latent_cache)
        scores = (scores + self.bmm_nt(q_rope, rope_cache)) * self.scale              # [B, N*S, T]
        scores = ops.cast(scores, self.softmax_dtype).reshape(batch, self.heads, seq, -1) + mask
        probs = ops.cast(ops.softmax(scores, -1), self.compute_dtype).reshape(batch, self.heads * seq, -1)
        context = self.bmm(probs, latent_cache).reshape(batch, self.heads, seq, self.rank)
        context = self._per_head(context.transpose(0, 2, 1, 3), kv_weight[:, self.nope:].transpose(0, 2, 1))
        context = context.transpose(0, 2, 1, 3).reshape(batch, seq, self.heads * self.v_dim)
        return attn.o_proj(context), latent_cache, rope_cache


class CachedForward(nn.Cell):
    """The main model over S new tokens per row at cache slots `slots`, reading and extending the caches.

    construct(ids [B, S], slots int32 [S], pads int32 [B], latents, ropes) -> (float32 logits [B, vocab] of the
    last new token, latents, ropes); latents / ropes: one cache tensor per main layer."""

    def __init__(self, model, max_length):
        super().__init__(auto_prefix=False)
        config = model.model_config
        rotary = model.model.rotary
        require(max_length <= rotary.length, "max_length", max_length,
                f"exceeds the model's RoPE table ({rotary.length} positions, model_config.seq_length)")
        self.model = model
        self.max_length = max_length
        self.attentions = nn.CellList([AbsorbedAttention(model.model.layers[index].self_attn, config)
                                       for index in range(config.num_hidden_layers)])
        self.num_layers = config.num_hidden_layers

    def _positional(self, slots, pads):
        """(cos, sin [B, S, R/2] at each row's positions, mask [B, 1, S, T], slot one-hot [S, T])."""
        rotary = self.model.model.rotary
        positions = ops.maximum(slots.reshape(1, -1) - pads.reshape(-1, 1), 0)
        cos, sin = ops.gather(rotary.cos, positions, 0), ops.gather(rotary.sin, positions, 0)
        key_slots = ops.arange(0, self.max_length, dtype=ms.int32)
        visible = ops.logical_and(key_slots.reshape(1, 1, -1) <= slots.reshape(1, -1, 1),
                                  key_slots.reshape(1, 1, -1) >= pads.reshape(-1, 1, 1))      # [B, S, T]
        mask = ops.select(visible, ops.zeros(visible.shape, ms.float32),
                          ops.full(visible.shape, MASK_VALUE, dtype=ms.float32)).expand_dims(1)
        slot_hot = ops.cast(key_slots.reshape(1, -1) == slots.reshape(-1, 1), ms.float32)
        return cos, sin, mask, slot_hot

    def construct(self, ids, slots, pads, latents, ropes):
        cos, sin, mask, slot_hot = self._positional(slots, pads)
        hidden = self.model.model.embed_tokens(ids)
        new_latents, new_ropes = (), ()
        for index in range(self.num_layers):
            layer = self.model.model.layers[index]
            attended, latent, rope = self.attentions[index](layer.input_layernorm(hidden), cos, sin, mask, slot_hot,
                                                            latents[index], ropes[index])
            new_latents, new_ropes = new_latents + (latent,), new_ropes + (rope,)
            hidden = hidden + attended
            mlp_out = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden + (mlp_out[0] if layer.is_moe else mlp_out)
        last = self.model.model.norm(hidden[:, -1:])
        logits = self.model.head(last)
        return logits.reshape(logits.shape[0], -1), new_latents, new_ropes


class DeepseekV3CachedDecoder:
    """`mindpretrain.generation.sampling.CachedDecoder` for one batch: caches allocated for `max_length`
    positions per row, `prefill` once, then `step` one token per row at a time."""

    def __init__(self, model, batch_size, max_length):
        config = model.model_config
        model.set_train(False)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.forward = CachedForward(model, self.max_length)
        dtype = ms_dtype(config.compute_dtype)
        layers = config.num_hidden_layers
        self.latents = tuple(ops.zeros((batch_size, max_length, config.kv_lora_rank), dtype) for _ in range(layers))
        self.ropes = tuple(ops.zeros((batch_size, max_length, config.qk_rope_head_dim), dtype) for _ in range(layers))
        self.next_slot = None
        self.pads = None

    def _run(self, ids, slots):
        # mutable: in GRAPH mode a plain tuple of tensors is a constant of the graph, recompiled at every call
        logits, latents, ropes = self.forward(Tensor(ids, ms.int32), Tensor(slots, ms.int32), self.pads,
                                              ms.mutable(self.latents), ms.mutable(self.ropes))
        self.latents, self.ropes = tuple(latents), tuple(ropes)
        return logits.asnumpy().astype(np.float32)

    def prefill(self, ids, lengths):
        ids, lengths = np.asarray(ids, dtype=np.int32), np.asarray(lengths, dtype=np.int32)
        require(ids.ndim == 2 and ids.shape[0] == self.batch_size, "ids", list(ids.shape),
                f"must be [batch_size={self.batch_size}, prompt length]")
        require(ids.shape[1] <= self.max_length, "ids", list(ids.shape), f"exceed the cache ({self.max_length})")
        require(lengths.shape == (self.batch_size,) and lengths.min() >= 1 and lengths.max() <= ids.shape[1],
                "lengths", lengths.tolist(), f"must be one length in [1, {ids.shape[1]}] per row")
        self.pads = Tensor(ids.shape[1] - lengths, ms.int32)
        self.next_slot = ids.shape[1]
        return self._run(ids, np.arange(ids.shape[1], dtype=np.int32))

    def step(self, tokens):
        require(self.next_slot is not None, "step", None, "needs a prefill first")
        require(self.next_slot < self.max_length, "step", self.next_slot, f"the cache is full ({self.max_length})")
        tokens = np.asarray(tokens, dtype=np.int32).reshape(self.batch_size, 1)
        logits = self._run(tokens, np.array([self.next_slot], dtype=np.int32))
        self.next_slot += 1
        return logits


def cached_decoder(model, batch_size, max_length):
    """The plugin's `ModelSpec.cached_decoder`."""
    return DeepseekV3CachedDecoder(model, batch_size, max_length)
