"""DeepSeek-V3 for causal language modelling: `DeepseekV3Model` (embedding, decoder blocks, final norm) and
`DeepseekV3ForCausalLM` (output head, LM loss, MTP losses, expert load, aux-loss-free bias update).

Calls (the contract with the trainer):

    loss, lm_loss, mtp_loss, balance_loss, expert_load = model(input_ids, labels, loss_mask)
    logits = model(input_ids)                       # float32 [B, S, vocab], main head

* inputs int32 [B, S]; labels are already shifted (labels[i] is the token after input_ids[i]); loss_mask
  float32 [B, S] weights each position (0 = ignore). Negative labels are allowed at masked positions.
* lm_loss: mean over loss_mask of the token cross-entropy (computed in float32).
* mtp_loss: the mean over the D MTP modules of their masked cross-entropy (0 when D = 0).
* loss = lm_loss + mtp_loss_factor * mtp_loss + balance_loss   (= lm + factor/D * sum_k L_k + balance)
* balance_loss: sum over MoE blocks (main and MTP) of the sequence-wise balance loss (0 if alpha = 0).
* expert_load: float32 [num_moe_layers, n_routed_experts], tokens routed to each expert by each MoE block, in
  layer order (main MoE layers, then MTP blocks) — the order of `moe_layer_biases()`. No gradient.

Parameter names equal the HF checkpoint names; the model checks itself against `weight_mapping` when built.
Cells shared for pipeline placement (each MTP block's `embed_tokens`, a tied `lm_head`) hold the main Parameters,
so every parameter is reported once, under the first cell path that holds it (see `_name_by_first_path`).
"""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.registry import register
from research.deepseek3.decoder import DecoderLayer
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.head import OutputHead
from research.deepseek3.layers import Embedding, RMSNorm, ms_dtype
from research.deepseek3.mla import causal_mask
from research.deepseek3.moe import expert_bias_update
from research.deepseek3.mtp import MTPLayer, shift_left
from research.deepseek3.rope import RotaryEmbedding
from research.deepseek3.weight_mapping import hf_parameter_shapes


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
        _name_by_first_path(self)

    def positional(self, seq_length):
        """(cos, sin, causal mask) shared by every block of one forward."""
        cos, sin = self.rotary(seq_length)
        return cos, sin, causal_mask(seq_length)

    def construct(self, input_ids):
        """-> (final normed hidden [B,S,H], expert loads tuple, balance loss sum)."""
        cos, sin, mask = self.positional(input_ids.shape[1])
        hidden = self.embed_tokens(input_ids)
        loads = ()
        balance = Tensor(0.0, ms.float32)
        for index in range(self.num_layers):
            hidden, load, layer_balance = self.layers[index](hidden, cos, sin, mask)
            if load is not None:
                loads = loads + (load,)
                balance = balance + ops.cast(layer_balance, ms.float32)
        return self.norm(hidden), loads, balance


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
        expected = hf_parameter_shapes(self.model_config)
        actual = {name: tuple(param.shape) for name, param in self.parameters_and_names()}
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

    def construct(self, input_ids, labels=None, loss_mask=None):
        hidden, loads, balance = self.model(input_ids)
        if labels is None:
            return self.head(hidden)
        if loss_mask is None:
            loss_mask = ops.ones(labels.shape, ms.float32)
        lm_loss = self.lm_head.masked_cross_entropy(hidden, labels, loss_mask)

        mtp_total = Tensor(0.0, ms.float32)
        if self.mtp_depth > 0:
            cos, sin, mask = self.model.positional(input_ids.shape[1])
            previous = hidden
            for depth in range(self.mtp_depth):
                layer = self.model.layers[self.num_layers + depth]
                # module depth+1 reads t_{i+depth+1} = input_ids[i+depth+1]; the zero-filled tail only feeds
                # positions whose targets are masked, and causal attention keeps them from earlier positions
                previous, normed, load, layer_balance = layer(shift_left(input_ids, depth + 1), previous, cos, sin,
                                                              mask)
                loads = loads + (load,)
                balance = balance + ops.cast(layer_balance, ms.float32)
                mtp_total = mtp_total + self.lm_head.masked_cross_entropy(
                    normed, shift_left(labels, depth + 1), shift_left(loss_mask, depth + 1))
            mtp_loss = mtp_total / self.mtp_depth
        else:
            mtp_loss = mtp_total
        loss = lm_loss + self.mtp_loss_factor * mtp_loss + balance
        if loads:
            expert_load = ops.stop_gradient(ops.stack(loads))
        else:
            expert_load = ops.zeros((0, self.n_routed_experts), ms.float32)
        return loss, lm_loss, mtp_loss, balance, expert_load

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
