"""One DeepSeek-V3 decoder block: pre-norm MLA attention, then a dense SwiGLU FFN or a DeepSeekMoE FFN.

    h = x + self_attn(input_layernorm(x));  out = h + mlp(post_attention_layernorm(h))

Layers below `first_k_dense_replace` use the dense FFN (`mlp.{gate,up,down}_proj`), the others the MoE block
(`mlp.gate`, `mlp.experts.E`, `mlp.shared_experts`). `block()` returns the expert load and balance loss too,
so the model can collect them per MoE layer (dense layers report none); padding of packed rows is left out of both. The two residual adds are primitives
declared in `shard_ops` (kind `residual_add`, see layers.py).
"""
from mindspore import nn, ops

from research.deepseek3.layers import RMSNorm, SwiGLU
from research.deepseek3.mla import MultiHeadLatentAttention
from research.deepseek3.moe import DeepseekV3MoE


class DecoderLayer(nn.Cell):
    def __init__(self, model_config, layer_index):
        super().__init__()
        self.layer_index = layer_index
        self.is_moe = model_config.is_moe_layer(layer_index)
        self.input_layernorm = RMSNorm(model_config.hidden_size, model_config)
        self.self_attn = MultiHeadLatentAttention(model_config)
        self.post_attention_layernorm = RMSNorm(model_config.hidden_size, model_config)
        if self.is_moe:
            self.mlp = DeepseekV3MoE(model_config)
        else:
            self.mlp = SwiGLU(model_config.hidden_size, model_config.intermediate_size, model_config)
        self.attention_residual = ops.Add()
        self.mlp_residual = ops.Add()
        self.shard_ops = {"attention_residual": "residual_add", "mlp_residual": "residual_add"}

    def block(self, x, cos, sin, mask, real_tokens=None):
        """-> (hidden, expert load [E] or None, balance loss or None). `real_tokens` float32 [B, S] (1 = a
        document's token, 0 = padding of a packed row; None = all real) only steers the MoE statistics."""
        hidden = self.attention_residual(x, self.self_attn(self.input_layernorm(x), cos, sin, mask))
        normed = self.post_attention_layernorm(hidden)
        if self.is_moe:
            out, load, balance = self.mlp(normed, real_tokens)
            return self.mlp_residual(hidden, out), load, balance
        return self.mlp_residual(hidden, self.mlp(normed)), None, None

    def construct(self, x, cos, sin, mask, real_tokens=None):
        return self.block(x, cos, sin, mask, real_tokens)
