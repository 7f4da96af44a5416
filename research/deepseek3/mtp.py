"""Multi-token prediction (DeepSeek-V3 report, section 2.2), one module per extra predicted token.

Module k (k = 1..D, stored as `model.layers.{num_hidden_layers + k - 1}`) predicts token t_{i+k+1} at position i:

    h^k_i = Block_k( eh_proj( concat( enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i) ) ) )    embedding FIRST
    p^k_i = Head( shared_head.norm(h^k_i) )

h^0 is the main model's final (normed) hidden state, as in the DeepSeek-V3 serving code (vLLM) and
transformers' MtpModel; h^k feeds module k+1 before its norm. Emb and Head are the main model's (shared);
`shared_head.norm` is the module's own. The released weights order the concatenation embedding first (the
report's formula lists the hidden state first); `eh_proj.weight[:, :H]` multiplies the embedding.

With labels already shifted (labels[i] = t_{i+1}), the inputs of module k are input_ids shifted left by k (real
tokens, as Megatron-Core does, never the ignore values labels may carry) and its targets labels shifted left by
k, weighted by loss_mask shifted left by k; the last k positions have no target and get weight 0. The training
loss adds `mtp_loss_factor / D * sum_k L_k`. In rows packed with several documents the weight of position i at
depth k is also 0 unless i and i+k are in the same document (`same_document_ahead`): block k at i reads the
token i+k, which must still belong to i's document.

Pipeline parallelism puts the MTP blocks on the last stage while the main embedding lives on stage 0, so each
block has its own `embed_tokens` cell holding the main embedding Parameter (shared, not a copy: no parameter or
checkpoint name is added; the release's `model.layers.{L+i}.embed_tokens.weight` duplicate has the same path).
The output head is the main model's `lm_head` cell, which sits on the last stage with the blocks.
"""
import mindspore as ms
from mindspore import nn, ops

from research.deepseek3.decoder import DecoderLayer
from research.deepseek3.layers import Embedding, Linear, RMSNorm


def shift_left(tensor, steps):
    """[B, S] -> [B, S] with tensor[:, steps:] first and zeros in the last `steps` positions."""
    if steps == 0:
        return tensor
    return ops.concat((tensor[:, steps:], ops.zeros_like(tensor[:, :steps])), 1)


def same_document_ahead(documents, steps):
    """float32 [B, S]: 1 where position i and i+steps are in the same document of a packed row (`documents`, the
    int document ids), 0 elsewhere and in the last `steps` positions. The depth-`steps` MTP target of i (the
    token at i+steps+1) is only meaningful when i+steps still reads i's document."""
    same = ops.cast(documents[:, steps:] == documents[:, :-steps], ms.float32)
    return ops.concat((same, ops.zeros((documents.shape[0], steps), ms.float32)), 1)


class SharedHead(nn.Cell):
    """Holds the module's final norm; the output projection itself is the main model's head (shared)."""

    def __init__(self, model_config):
        super().__init__()
        self.norm = RMSNorm(model_config.hidden_size, model_config)

    def construct(self, hidden):
        return self.norm(hidden)


class MTPLayer(DecoderLayer):
    """A decoder block (always MoE) preceded by the embedding/hidden merge and followed by its own norm."""

    def __init__(self, model_config, layer_index, embedding_weight):
        super().__init__(model_config, layer_index)
        self.embed_tokens = Embedding(model_config, shared_weight=embedding_weight)
        self.enorm = RMSNorm(model_config.hidden_size, model_config)
        self.hnorm = RMSNorm(model_config.hidden_size, model_config)
        self.eh_proj = Linear(2 * model_config.hidden_size, model_config.hidden_size, model_config, "mtp.eh_proj")
        self.shared_head = SharedHead(model_config)
        self.merge_concat = ops.Concat(-1)
        self.shard_ops = dict(self.shard_ops, merge_concat="mtp.concat")

    def construct(self, input_ids, previous_hidden, cos, sin, mask, real_tokens=None, embedded=None):
        """input_ids: the tokens this block reads (already shifted; `embedded`: already looked up) ->
        (h^k before the norm, shared_head.norm(h^k), expert load, balance loss)."""
        if embedded is None:
            embedded = self.embed_tokens(input_ids)
        merged = self.eh_proj(self.merge_concat((self.enorm(embedded), self.hnorm(previous_hidden))))
        hidden, load, balance = self.block(merged, cos, sin, mask, real_tokens)
        return hidden, self.shared_head(hidden), load, balance
