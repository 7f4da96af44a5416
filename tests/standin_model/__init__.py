"""A tiny MoE language model with the DeepSeek-V3 training-call contract, for trainer tests.

It has what the trainer relies on and nothing else: HF-style parameter names, a router with a
no-grad `e_score_correction_bias` whose top-k choice produces `expert_load`, an extra "MTP" loss,
and `update_expert_bias` with the aux-loss-free sign rule. Loaded with
`--register_path tests/standin_model`; YAML `model_config.type: StandInConfig`, `arch.type: StandInMoE`.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindpretrain.registry import register


@register("config")
class StandInConfig:
    def __init__(self, vocab_size=256, hidden_size=16, n_routed_experts=4, num_experts_per_tok=1,
                 num_moe_layers=1, topk_bias_update_rate=0.001, mtp_loss_factor=0.3, seed=0,
                 compute_dtype="float32", **unused):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.n_routed_experts, self.num_experts_per_tok = n_routed_experts, num_experts_per_tok
        self.num_moe_layers, self.topk_bias_update_rate = num_moe_layers, topk_bias_update_rate
        self.mtp_loss_factor, self.seed = mtp_loss_factor, seed
        self.compute_dtype = compute_dtype   # "float16": matmuls in float16 (loss-scaling tests)


@register("model")
class StandInMoE(nn.Cell):
    def __init__(self, model_config):
        super().__init__()
        rng = np.random.RandomState(model_config.seed)
        vocab, hidden, experts = model_config.vocab_size, model_config.hidden_size, model_config.n_routed_experts
        self.model_config = model_config
        self.embed = Parameter(Tensor(rng.normal(0, 0.1, (vocab, hidden)).astype(np.float32)),
                               name="model.embed_tokens.weight")
        self.gate = Parameter(Tensor(rng.normal(0, 0.5, (experts, hidden)).astype(np.float32)),
                              name="model.layers.0.mlp.gate.weight")
        self.bias = Parameter(Tensor(np.zeros(experts, np.float32)),
                              name="model.layers.0.mlp.gate.e_score_correction_bias", requires_grad=False)
        self.up = Parameter(Tensor(rng.normal(0, 0.1, (experts, hidden, hidden)).astype(np.float32)),
                            name="model.layers.0.mlp.experts.weight")
        self.head = Parameter(Tensor(rng.normal(0, 0.1, (vocab, hidden)).astype(np.float32)), name="lm_head.weight")
        self.ce = nn.CrossEntropyLoss(reduction="none")
        self.experts = experts
        self.half = model_config.compute_dtype == "float16"
        self.reduction = "mean"

    def _compute(self, tensor):
        """float32 master weights/activations -> the compute dtype (a no-op graph in float32)."""
        return ops.cast(tensor, ms.float16) if self.half else tensor

    def _logits(self, hidden):
        logits = ops.matmul(self._compute(hidden), self._compute(self.head).T)
        return ops.cast(logits, ms.float32) if self.half else logits

    def _loss(self, logits, labels, mask):
        vocab = logits.shape[-1]
        per_token = self.ce(logits.reshape(-1, vocab), labels.reshape(-1))
        mask = mask.reshape(-1)
        if self.reduction == "sum":
            return ops.reduce_sum(per_token * mask)
        return ops.reduce_sum(per_token * mask) / ops.maximum(ops.reduce_sum(mask), 1.0)

    def set_loss_reduction(self, reduction):
        """"mean" (default) or "sum": the per-token-loss contract of the real model."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"loss reduction ({reduction!r}) must be 'mean' or 'sum'")
        self.reduction = reduction

    def construct(self, input_ids, labels=None, loss_mask=None, position_ids=None, actual_seq_len=None):
        hidden = ops.gather(self.embed, input_ids, 0)
        if position_ids is not None:
            # packed rows: the positions change the hidden state, so a wrong column order shows in the loss
            hidden = hidden + 0.01 * ops.cast(position_ids, ms.float32).expand_dims(-1)
        scores = ops.sigmoid(ops.matmul(hidden, self.gate.T))
        _, chosen = ops.topk(scores + self.bias, 1)
        one_hot = ops.one_hot(chosen.reshape(input_ids.shape), self.experts,
                              Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        weight = ops.gather_elements(scores, -1, chosen)
        # each expert's matrix, mixed by the one-hot routing (dense, but the gradient depends on the route)
        expert_weight = ops.matmul(one_hot.reshape(-1, self.experts), self.up.reshape(self.experts, -1))
        expert_weight = expert_weight.reshape(input_ids.shape + (self.up.shape[1], self.up.shape[2]))
        expert_out = ops.tanh(ops.squeeze(ops.matmul(hidden.expand_dims(-2), expert_weight), -2))
        hidden = hidden + weight * expert_out
        logits = self._logits(hidden)
        if labels is None:
            return logits
        lm_loss = self._loss(logits, labels, loss_mask)
        # "MTP": a second head on the same hidden states (no slicing: keeps the stand-in's kernels simple)
        mtp_loss = self._loss(self._logits(ops.tanh(hidden)), labels, loss_mask)
        balance = ops.zeros((), ms.float32)
        load = ops.reduce_sum(one_hot.reshape(-1, self.experts), 0).reshape(1, -1)
        return lm_loss + self.model_config.mtp_loss_factor * mtp_loss, lm_loss, mtp_loss, balance, load

    def moe_layer_biases(self):
        return [self.bias]

    def update_expert_bias(self, load):
        load = np.asarray(load, np.float32).reshape(1, -1)
        bias = self.bias.asnumpy()
        new = bias + self.model_config.topk_bias_update_rate * np.sign(load.mean(axis=1, keepdims=True) - load)[0]
        self.bias.set_data(Tensor(new.astype(np.float32)))
