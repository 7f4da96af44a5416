"""DeepSeek-V3 for causal language modelling: `DeepseekV3Model` (embedding, decoder blocks, final norm) and
`DeepseekV3ForCausalLM` (output head, LM loss, MTP losses, expert load, aux-loss-free bias update).

Calls (the contract with the trainer):

    loss, lm_loss, mtp_loss, balance_loss, expert_load = model(input_ids, labels, loss_mask,
                                                               position_ids=None, actual_seq_len=None)
    logits = model(input_ids, position_ids=None, actual_seq_len=None)    # float32 [B, S, vocab], main head

* inputs int32 [B, S]; labels are already shifted (labels[i] is the token after input_ids[i]); loss_mask
  float32 [B, S] weights each position (0 = ignore). Negative labels are allowed at masked positions.
* position_ids, actual_seq_len int32 [B, S] (both or neither): rows packed with whole documents (the SFT rows of
  mindpretrain's SFT data contract). The document of position p is the number of actual_seq_len entries <= p,
  so the padding after the last end is one block of its own; attention is causal within a document, RoPE reads
  position_ids, an MTP target at depth k counts only when i and i+k share a document, and padding
  (p >= actual_seq_len[:, -1]) is left out of the expert load and the balance loss. Without them the
  computation is the original one (one causal sequence per row), operation for operation.
* lm_loss: mean over loss_mask of the token cross-entropy (computed in float32); its sum after
  `set_loss_reduction("sum")`.
* mtp_loss: the mean over the D MTP modules of their masked cross-entropy (0 when D = 0).
* loss = lm_loss + mtp_loss_factor * mtp_loss + balance_loss   (= lm + factor/D * sum_k L_k + balance)
* balance_loss: sum over MoE blocks (main and MTP) of the sequence-wise balance loss, or MindFormers' "expert"
  loss when a MindFormers YAML sets aux_loss_types (`balance_loss_kind`; 0 if alpha = 0).
* expert_load: float32 [num_moe_layers, n_routed_experts], tokens routed to each expert by each MoE block, in
  layer order (main MoE layers, then MTP blocks) — the order of `moe_layer_biases()`. No gradient.

Parameter names equal the HF checkpoint names; the model checks itself against `weight_mapping` when built.
Cells shared for pipeline placement (each MTP block's `embed_tokens`, a tied `lm_head`) hold the main Parameters,
so every parameter is reported once, under the first cell path that holds it (see `_name_by_first_path`).
"""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.parallel.expert_groups import keeps_parameter, unstacked_shapes
from mindpretrain.registry import register
from mindpretrain.validation import require
from research.deepseek3.decoder import DecoderLayer
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.flash_attention import FlashAttentionCore
from research.deepseek3.head import OutputHead
from research.deepseek3.layers import Embedding, RMSNorm, ms_dtype
from research.deepseek3.mla import causal_mask, document_causal_mask, document_ids
from research.deepseek3.moe import expert_bias_update
from research.deepseek3.mtp import MTPLayer, same_document_ahead, shift_left
from research.deepseek3.rope import RotaryEmbedding
from research.deepseek3.weight_mapping import hf_parameter_shapes

LOSS_REDUCTIONS = ("mean", "sum")


def _as_model_config(model_config):
    """A DeepseekV3Config as given, or built from a `model_config` mapping (its `type` key dropped)."""
    if isinstance(model_config, DeepseekV3Config) or type(model_config).__name__ == "DeepseekV3Config":
        return model_config
    if isinstance(model_config, dict):
        values = {key: value for key, value in model_config.items() if key not in ("type", "auto_register")}
        return DeepseekV3Config(**values)
    raise TypeError(f"DeepSeek-V3 needs a DeepseekV3Config or a model_config mapping, "
                    f"got {type(model_config).__name__}")


def _name_by_first_path(cell):
    """Name every Parameter after the first cell path holding it (`cells_and_names` order).

    MindSpore renames a Parameter each time a cell holding it is attached to a parent, so a Parameter shared by
    two cells would end up named after whichever was attached last. Re-deriving the names once the tree is
    complete makes them the HF names again (`model.embed_tokens.weight`, registered before any sharer)."""
    cell.update_parameters_name()


class DeepseekV3Model(nn.Cell):
    """Embedding -> num_hidden_layers decoder blocks -> final RMSNorm. MTP modules live in `layers` after the
    main blocks (their HF names are model.layers.{L+i}) but are run by DeepseekV3ForCausalLM."""

    def __init__(self, model_config):
        super().__init__()
        model_config = _as_model_config(model_config)
        self.model_config = model_config
        self.num_layers = model_config.num_hidden_layers
        self.embed_tokens = Embedding(model_config)
        layers = [DecoderLayer(model_config, index) for index in range(self.num_layers)]
        layers += [MTPLayer(model_config, self.num_layers + depth, self.embed_tokens.weight)
                   for depth in range(model_config.num_nextn_predict_layers)]
        self.layers = nn.CellList(layers)
        self.norm = RMSNorm(model_config.hidden_size, model_config)
        self.rotary = RotaryEmbedding(model_config, model_config.seq_length)
        # every block's core is of one kind (mla.attention_core); flash attention reads a layout, not a mask
        self.flash_attention = isinstance(self.layers[0].self_attn.core, FlashAttentionCore)
        # expanded once per forward to [B, heads, S, S] where the cores broadcast explicitly (layers.py), instead
        # of once per block and again in each block's backward
        self.expand_mask = self.layers[0].self_attn.core.explicit_broadcast if not self.flash_attention else False
        self.num_heads = model_config.num_attention_heads
        _name_by_first_path(self)

    def positional(self, seq_length, position_ids=None, actual_seq_len=None):
        """(cos, sin, mask, documents) shared by every block of one forward, main and MTP.

        One causal sequence per row: cos/sin [S, R/2], mask [1, 1, S, S], documents None. Packed rows
        (position_ids and actual_seq_len int [B, S]): cos/sin [B, 1, S, R/2] gathered at position_ids, the
        per-document causal mask [B, 1, S, S] and the document id of every position, int32 [B, S].
        With the flash-attention core the mask slot holds its layout instead (`flash_positional`)."""
        if self.flash_attention:
            return self.flash_positional(seq_length, position_ids, actual_seq_len)
        if actual_seq_len is None:
            cos, sin = self.rotary(seq_length)
            return cos, sin, causal_mask(seq_length), None
        documents = document_ids(actual_seq_len, seq_length)
        cos, sin = self.rotary(seq_length, position_ids)
        return cos, sin, document_causal_mask(documents), documents

    def batch_mask(self, mask, batch):
        """`positional`'s mask expanded to [batch, heads, S, S] when the cores broadcast explicitly, else as is."""
        if not self.expand_mask or mask is None:
            return mask
        return ops.broadcast_to(mask, (batch, self.num_heads) + mask.shape[2:])

    def flash_positional(self, seq_length, position_ids=None, actual_seq_len=None):
        """`positional` for the flash-attention core: the same cos/sin and documents, and in the mask slot None
        (one causal sequence per row) or the flattened cumulative segment ends int32 [B*K] of packed rows
        (research/deepseek3/flash_attention.py), built once and read by every block."""
        if actual_seq_len is None:
            cos, sin = self.rotary(seq_length)
            return cos, sin, None, None
        documents = document_ids(actual_seq_len, seq_length)
        cos, sin = self.rotary(seq_length, position_ids)
        return cos, sin, self.layers[0].self_attn.core.attention_layout(seq_length, actual_seq_len), documents

    def decode(self, input_ids, cos, sin, mask, real_tokens=None, embedded=None):
        """Embedding, the main blocks, the final norm -> (normed hidden [B,S,H], expert loads tuple, balance sum).
        `embedded`: input_ids already embedded (the caller looked them up together with the MTP blocks' ids)."""
        hidden = self.embed_tokens(input_ids) if embedded is None else embedded
        loads = ()
        balance = Tensor(0.0, ms.float32)
        for index in range(self.num_layers):
            hidden, load, layer_balance = self.layers[index](hidden, cos, sin, mask, real_tokens)
            if load is not None:
                loads = loads + (load,)
                balance = balance + ops.cast(layer_balance, ms.float32)
        return self.norm(hidden), loads, balance

    def construct(self, input_ids, position_ids=None, actual_seq_len=None):
        """-> (final normed hidden [B,S,H], expert loads tuple, balance loss sum)."""
        check_packing_inputs(position_ids, actual_seq_len)
        cos, sin, mask, _ = self.positional(input_ids.shape[1], position_ids, actual_seq_len)
        return self.decode(input_ids, cos, sin, mask, real_token_weights(actual_seq_len, input_ids.shape[1]))


def check_packing_inputs(position_ids, actual_seq_len):
    """Packed rows need both columns: RoPE positions without document ends (or the reverse) would mix rules."""
    if (position_ids is None) != (actual_seq_len is None):
        raise ValueError("packed rows need both position_ids and actual_seq_len (or neither, for one causal "
                         f"sequence per row); got position_ids {'None' if position_ids is None else 'set'}, "
                         f"actual_seq_len {'None' if actual_seq_len is None else 'set'}")


def real_token_weights(actual_seq_len, seq_length):
    """float32 [B, S]: 1 for the positions of a packed row's documents, 0 for the padding after the last end
    (p >= actual_seq_len[:, -1]); None for unpacked rows (every position counts, the original arithmetic)."""
    if actual_seq_len is None:
        return None
    positions = ops.arange(0, seq_length, dtype=ms.int32).reshape(1, seq_length)
    last_end = ops.cast(actual_seq_len[:, -1:], ms.int32)
    return ops.stop_gradient(ops.cast(positions < last_end, ms.float32))


def masked_cross_entropy(logits, labels, weights):
    """Reference form of the loss on materialised logits (the model computes it chunked: head.py)."""
    # Sum(weights * CE) / Sum(weights) in float32; labels outside [0, vocab) must carry weight 0.
    if logits.dtype != ms.float32:
        logits = ops.cast(logits, ms.float32)
    vocab = logits.shape[-1]
    safe = ops.clamp(labels, 0, vocab - 1)
    log_probs = ops.log_softmax(logits, -1)         # one fused kernel: the fewest [B, S, vocab] temporaries
    token_loss = -ops.gather_elements(log_probs, -1, ops.expand_dims(safe, -1)).squeeze(-1)
    weights = ops.cast(weights, ms.float32)
    total = weights.sum()
    denominator = ops.select(total > 0, total, ops.ones_like(total))
    return (token_loss * weights).sum() / denominator


@register("model")
class DeepseekV3ForCausalLM(nn.Cell):
    def __init__(self, model_config=None, **kwargs):
        super().__init__()
        model_config = _as_model_config(model_config if model_config is not None else kwargs)
        self.model_config = model_config
        self.model = DeepseekV3Model(model_config)
        self.tied = bool(model_config.tie_word_embeddings)
        self.lm_head = OutputHead(model_config, shared_weight=self.model.embed_tokens.weight if self.tied else None)
        self.num_layers = model_config.num_hidden_layers
        self.mtp_depth = model_config.num_nextn_predict_layers
        self.mtp_loss_factor = float(model_config.mtp_loss_factor)
        self.compute_dtype = ms_dtype(model_config.compute_dtype)
        self.vocab_size = model_config.vocab_size
        self.n_routed_experts = model_config.n_routed_experts
        self.loss_reduction = "mean"
        # one embedding lookup for the main model and every MTP block (one [vocab, H] gradient instead of 1 + D
        # summed); off under pipeline parallelism, where the MTP blocks look up on the last stage
        self.merge_embedding_lookups = True
        self._apply_recompute(model_config.recompute)
        _name_by_first_path(self)
        self._check_names_and_shapes()

    # ----- construction helpers ---------------------------------------------------------------------------
    def _apply_recompute(self, modes):
        """'full': recompute the whole block in backward; 'selective': only the attention core (S x S part)."""
        for index, mode in enumerate(modes):
            layer = self.model.layers[index]
            if mode == "full":
                layer.recompute()
            elif mode == "selective":
                layer.self_attn.core.recompute()

    def _check_names_and_shapes(self):
        """Names and shapes equal the HF table; with experts partitioned (`model_config.expert_layout`), the table
        restricted to this rank's expert slice; routed experts stored stacked count as their per-expert slices."""
        layout = getattr(self.model_config, "expert_layout", None)
        expected = {name: shape for name, shape in hf_parameter_shapes(self.model_config).items()
                    if keeps_parameter(layout, name)}
        actual = unstacked_shapes({name: tuple(param.shape) for name, param in self.parameters_and_names()})
        if actual != dict(expected):
            missing = sorted(set(expected) - set(actual))
            extra = sorted(set(actual) - set(expected))
            wrong = sorted(name for name in set(actual) & set(expected) if actual[name] != expected[name])
            raise RuntimeError(f"model parameters disagree with weight_mapping: missing {missing[:10]}, "
                               f"extra {extra[:10]}, misshaped {wrong[:10]}")

    # ----- forward ----------------------------------------------------------------------------------------
    def head(self, hidden):
        """float32 logits [B, S, vocab] of the (shared) output head."""
        return self.lm_head(hidden)

    def logits_and_expert_load(self, input_ids):
        """float32 logits [B, S, vocab] of the main model (no MTP), the routed load of its MoE blocks
        [num_moe_layers, E] (zero rows for the MTP blocks) and their balance loss: what an RL objective needs from
        one forward, where the training loss of `construct` is not wanted."""
        cos, sin, mask, _ = self.model.positional(input_ids.shape[1])
        hidden, loads, balance = self.model.decode(input_ids, cos, sin, mask)
        mtp_rows = self.mtp_depth                                  # every MTP block is an MoE block
        if loads:
            load = ops.stop_gradient(ops.stack(loads))
            if mtp_rows:
                load = ops.concat((load, ops.zeros((mtp_rows, self.n_routed_experts), load.dtype)))
        else:
            load = ops.zeros((mtp_rows, self.n_routed_experts), ms.float32)
        return self.head(hidden), load, balance

    def set_loss_reduction(self, reduction):
        """"mean" (default): lm_loss = sum(mask * CE) / sum(mask), each MTP depth likewise. "sum": the sums alone
        (lm_loss = sum(mask * CE), mtp_loss = 1/D sum_k sum(mask_k * CE_k)), for per-token loss where the
        trainer's loss_mask already carries 1 / (global target count). Set it before the first compiled call:
        GRAPH mode reads it when it compiles."""
        require(reduction in LOSS_REDUCTIONS, "loss_reduction", reduction, f"must be one of {LOSS_REDUCTIONS}")
        self.loss_reduction = reduction

    def construct(self, input_ids, labels=None, loss_mask=None, position_ids=None, actual_seq_len=None):
        check_packing_inputs(position_ids, actual_seq_len)
        cos, sin, mask, documents = self.model.positional(input_ids.shape[1], position_ids, actual_seq_len)
        mask = self.model.batch_mask(mask, input_ids.shape[0])
        real_tokens = real_token_weights(actual_seq_len, input_ids.shape[1])
        if labels is None:
            return self.head(self.model.decode(input_ids, cos, sin, mask, real_tokens)[0])
        embedded = self._merged_embeddings(input_ids)
        hidden, loads, balance = self.model.decode(input_ids, cos, sin, mask, real_tokens,
                                                   embedded[0] if embedded else None)
        if loss_mask is None:
            loss_mask = ops.ones(labels.shape, ms.float32)
        segments = ((hidden, labels, loss_mask),)        # main, then each MTP depth: one head pass for all

        previous = hidden
        for depth in range(self.mtp_depth):
            layer = self.model.layers[self.num_layers + depth]
            # module depth+1 reads t_{i+depth+1} = input_ids[i+depth+1]; the zero-filled tail (and, in packed
            # rows, a document's last depth+1 positions, which read the next document) only feeds positions
            # whose targets are masked, and the causal/document mask keeps them from earlier positions
            previous, normed, load, layer_balance = layer(shift_left(input_ids, depth + 1), previous, cos, sin,
                                                          mask, real_tokens,
                                                          embedded[depth + 1] if embedded else None)
            loads = loads + (load,)
            balance = balance + ops.cast(layer_balance, ms.float32)
            mtp_mask = shift_left(loss_mask, depth + 1)
            if documents is not None:
                mtp_mask = mtp_mask * same_document_ahead(documents, depth + 1)
            segments = segments + ((normed, shift_left(labels, depth + 1), mtp_mask),)
        losses = self.lm_head.masked_cross_entropies(segments, self.loss_reduction)
        lm_loss = losses[0]
        mtp_total = Tensor(0.0, ms.float32)
        for depth_loss in losses[1:]:
            mtp_total = mtp_total + depth_loss
        mtp_loss = mtp_total / self.mtp_depth if self.mtp_depth > 0 else mtp_total
        loss = lm_loss + self.mtp_loss_factor * mtp_loss + balance
        if loads:
            expert_load = ops.stop_gradient(ops.stack(loads))
        else:
            expert_load = ops.zeros((0, self.n_routed_experts), ms.float32)
        return loss, lm_loss, mtp_loss, balance, expert_load

    def _merged_embeddings(self, input_ids):
        """(main, depth 1, ..., depth D) embedded [B, S, H] from one lookup of the stacked ids, or () when the
        lookups stay apart (no MTP, or `merge_embedding_lookups` off)."""
        if self.mtp_depth == 0 or not self.merge_embedding_lookups:
            return ()
        ids = (input_ids,) + tuple(shift_left(input_ids, depth + 1) for depth in range(self.mtp_depth))
        embedded = self.model.embed_tokens(ops.concat(ids, 0))
        batch = input_ids.shape[0]
        return tuple(embedded[index * batch:(index + 1) * batch] for index in range(self.mtp_depth + 1))

    # ----- aux-loss-free balancing ------------------------------------------------------------------------
    def moe_layer_biases(self):
        """The e_score_correction_bias Parameters of every MoE block, in layer order (main, then MTP)."""
        layers = self.model.layers
        return [layers[index].mlp.gate.e_score_correction_bias for index in self.model_config.moe_layer_indices]

    def update_expert_bias(self, load_np):
        """bias += rate * sign(mean(load) - load) per MoE block; `load_np` [num_moe_layers, E], summed over DP."""
        biases = self.moe_layer_biases()
        load = np.asarray(load_np, dtype=np.float32)
        expected = (len(biases), self.n_routed_experts)
        if load.shape != expected:
            raise ValueError(f"expert load has shape {load.shape}, expected {expected} "
                             "(num_moe_layers incl. MTP blocks, n_routed_experts)")
        for bias, layer_load in zip(biases, load):
            updated = expert_bias_update(bias.asnumpy(), layer_load, self.model_config.topk_bias_update_rate)
            bias.set_data(Tensor(updated.astype(np.float32)))
