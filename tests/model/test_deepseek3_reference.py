"""Our DeepSeek-V3 against HF transformers' DeepseekV3ForCausalLM (logits, loss) and against a torch reference
of the multi-token-prediction formula (transformers runs no MTP in its forward).

Each case builds a tiny random HF model (tests/hf_reference.py), saves it in the release layout (sharded, with
MTP layers), loads it with `load_hf_weights` and compares in float32. Cases cover YaRN (two mscale settings),
q_lora_rank set and null, group-limited routing and none, norm_topk_prob on/off, first_k_dense_replace 0/1/2,
interleaved and half-split RoPE, and a perturbed e_score_correction_bias that changes the expert selection.
"""
import numpy as np
import pytest

import mindspore as ms

from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
from research.deepseek3.hf_weights import load_hf_weights
from conftest import require_reference

TOLERANCE = 1e-4
BATCH, SEQ = 2, 24

CASES = {
    # YaRN + q LoRA + group routing (2 groups, keep 1) + norm_topk_prob + one dense layer + biased gate
    "yarn_qlora_groups": dict(),
    # plain RoPE, q_proj, no group limit, no renormalisation, all layers MoE, transformers-5 config.json
    "plain_qproj_nogroups": dict(q_lora_rank=None, rope_scaling=None, norm_topk_prob=False, first_k_dense_replace=0,
                                 n_group=1, topk_group=1, config_style="transformers"),
    # YaRN with distinct mscale / mscale_all_dim, half-split RoPE, 4 groups keep 2, two dense layers, 2 MTP modules
    "yarn_mscale_halfsplit": dict(rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                                "beta_fast": 24.0, "beta_slow": 2.0, "mscale": 0.8,
                                                "mscale_all_dim": 0.9},
                                  rope_interleave=False, n_group=4, topk_group=2, first_k_dense_replace=2,
                                  num_nextn_predict_layers=2, num_hidden_layers=3),
}


@pytest.fixture(scope="module", autouse=True)
def pynative_cpu():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")


def _batch(vocab, seed):
    """ids, our shifted labels/loss_mask, and HF labels (unshifted, -100 where our mask is 0)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, size=(BATCH, SEQ)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((BATCH, 1), -100)], axis=1).astype(np.int32)
    mask = (rng.rand(BATCH, SEQ) > 0.2).astype(np.float32)
    mask[:, -1] = 0.0
    hf_labels = ids.astype(np.int64).copy()
    hf_labels[:, 0] = -100
    hf_labels[:, 1:][mask[:, :-1] == 0] = -100
    return ids, labels, mask, hf_labels


class Case:
    """One HF model + its checkpoint + our model loaded from it (built once per case)."""

    def __init__(self, tmp_path_factory, name, overrides):
        from hf_reference import build_tiny_hf_deepseek_v3

        overrides = dict(overrides)
        self.name = name
        self.hf, self.hf_dir = build_tiny_hf_deepseek_v3(tmp_path_factory.mktemp(name), **overrides)
        self.cfg = DeepseekV3Config.from_hf(self.hf_dir, compute_dtype="float32", seq_length=SEQ,
                                            seq_balance_loss_alpha=0.0)
        self.model = DeepseekV3ForCausalLM(self.cfg)
        self.summary = load_hf_weights(self.model, self.hf_dir)
        self.ids, self.labels, self.mask, self.hf_labels = _batch(self.cfg.vocab_size, seed=len(name))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    require_reference("torch")
    require_reference("transformers")
    return Case(tmp_path_factory, request.param, CASES[request.param])


def test_logits_and_loss_match_transformers(case):
    import torch

    from hf_reference import hf_logits

    reference = hf_logits(case.hf, case.ids)
    ours = case.model(ms.Tensor(case.ids)).asnumpy()
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    diff = float(np.abs(ours - reference).max())
    print(f"{case.name}: logits max abs diff {diff:.3g} (logit scale {np.abs(reference).max():.2f})")
    assert diff <= TOLERANCE

    with torch.no_grad():
        hf_loss = case.hf(input_ids=torch.as_tensor(case.ids, dtype=torch.long),
                          labels=torch.as_tensor(case.hf_labels), use_cache=False).loss.item()
    loss, lm_loss, mtp_loss, balance, load = case.model(ms.Tensor(case.ids), ms.Tensor(case.labels),
                                                        ms.Tensor(case.mask))
    assert abs(float(lm_loss.asnumpy()) - hf_loss) <= TOLERANCE
    assert float(balance.asnumpy()) == 0.0
    expected_total = float(lm_loss.asnumpy()) + case.cfg.mtp_loss_factor * float(mtp_loss.asnumpy())
    assert abs(float(loss.asnumpy()) - expected_total) <= 1e-5
    # every token is routed to exactly k experts in every MoE block (main and MTP)
    assert load.shape == (case.cfg.num_moe_layers, case.cfg.n_routed_experts)
    assert np.all(load.asnumpy().sum(1) == BATCH * SEQ * case.cfg.num_experts_per_tok)


def test_mtp_loss_matches_torch_reference(case):
    reference = torch_mtp_losses(case)
    _, _, mtp_loss, _, _ = case.model(ms.Tensor(case.ids), ms.Tensor(case.labels), ms.Tensor(case.mask))
    expected = sum(reference) / len(reference)
    print(f"{case.name}: MTP losses {reference}, ours (mean) {float(mtp_loss.asnumpy()):.6f}")
    assert abs(float(mtp_loss.asnumpy()) - expected) <= TOLERANCE


def test_expert_bias_changes_selection(case):
    """The perturbed e_score_correction_bias must change which experts are chosen (so the match above covers it)."""
    import torch

    gate = case.hf.model.layers[case.cfg.first_k_dense_replace].mlp.gate
    captured = []
    handle = gate.register_forward_hook(lambda module, args, output: captured.append(args[0].detach().clone()))
    with torch.no_grad():
        case.hf(input_ids=torch.as_tensor(case.ids, dtype=torch.long), use_cache=False)
    handle.remove()
    with torch.no_grad():
        _, _, biased = gate(captured[0])
        saved = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()
        _, _, unbiased = gate(captured[0])
        gate.e_score_correction_bias.copy_(saved)
    changed = (biased.sort(-1).values != unbiased.sort(-1).values).any(-1).sum().item()
    assert changed > 0, "the test bias does not change the routing; the comparison would not exercise it"


def test_release_duplicates_checked_and_ignored(case):
    assert len(case.summary["duplicates_ignored"]) == 2 * case.cfg.num_nextn_predict_layers


# ----------------------------------------------------------------------------------------------------------------
# torch reference of multi-token prediction (independent of our implementation; uses HF's decoder block)
# ----------------------------------------------------------------------------------------------------------------

def _checkpoint_tensors(hf_dir):
    import glob

    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(glob.glob(f"{hf_dir}/*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _rms(x, weight, eps):
    import torch

    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def torch_mtp_losses(case):
    """Module k: h^k = Block_k(eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1})])), logits = Head(norm_k(h^k)),
    target t_{i+k+1}, h^0 = final normed hidden of the main model; masked mean CE per module."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    hf, cfg = case.hf, case.cfg
    tensors = _checkpoint_tensors(case.hf_dir)
    ids = torch.as_tensor(case.ids, dtype=torch.long)
    eps = cfg.rms_norm_eps
    with torch.no_grad():
        previous = hf.model(input_ids=ids, use_cache=False).last_hidden_state
        positions = torch.arange(SEQ)[None]
        cos_sin = hf.model.rotary_emb(previous, positions)
        causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None]
        losses = []
        for depth in range(1, cfg.num_nextn_predict_layers + 1):
            layer = cfg.num_hidden_layers + depth - 1
            prefix = f"model.layers.{layer}."
            block = DeepseekV3DecoderLayer(hf.config, layer).eval()
            state = {}
            for name in block.state_dict():
                if name == "mlp.experts.gate_up_proj":
                    state[name] = torch.stack([torch.cat([tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"],
                                                          tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"]])
                                               for e in range(cfg.n_routed_experts)])
                elif name == "mlp.experts.down_proj":
                    state[name] = torch.stack([tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"]
                                               for e in range(cfg.n_routed_experts)])
                else:
                    state[name] = tensors[prefix + name]
            block.load_state_dict(state)
            # inputs t_{i+depth} (0 past the end, masked), targets t_{i+depth+1}
            tokens = torch.zeros_like(ids)
            tokens[:, :SEQ - depth] = ids[:, depth:]
            embedded = hf.model.embed_tokens(tokens)
            merged = torch.cat([_rms(embedded, tensors[prefix + "enorm.weight"], eps),
                                _rms(previous, tensors[prefix + "hnorm.weight"], eps)], -1)
            hidden = merged @ tensors[prefix + "eh_proj.weight"].T
            hidden = block(hidden, attention_mask=causal, position_ids=positions, position_embeddings=cos_sin)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            logits = hf.lm_head(_rms(hidden, tensors[prefix + "shared_head.norm.weight"], eps))
            targets = np.zeros((BATCH, SEQ), np.int64)
            weights = np.zeros((BATCH, SEQ), np.float64)
            targets[:, :SEQ - depth - 1] = case.ids[:, depth + 1:]
            weights[:, :SEQ - depth] = case.mask[:, depth:]     # our mask, shifted like the targets
            token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                                           torch.as_tensor(targets).reshape(-1), reduction="none")
            weights_t = torch.as_tensor(weights).reshape(-1)
            losses.append(float((token_loss * weights_t).sum() / weights_t.sum()))
            previous = hidden
    return losses
