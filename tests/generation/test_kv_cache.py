"""The DeepSeek-V3 latent-cache decoder against the model's own full forward and transformers' greedy `generate`.

Each case loads a tiny random HF checkpoint (tests/hf_reference.py, release layout with MTP layers, which the
decoder does not run) into our model as tests/model/test_deepseek3_reference.py does. Prompts of mixed lengths are
left-padded into one batch, prefilled in one call and extended one token per step; at every step each row's
logits must equal the full forward of the model over that row's unpadded sequence (float32, <= 1e-5), and greedy
tokens must equal transformers' `generate(do_sample=False)` row by row. The cache must hold MLA's normalised
latent and the rotated RoPE key, nothing per head.
"""
import numpy as np
import pytest

import mindspore as ms

from conftest import require_reference
from mindpretrain.generation.sampling import FINISH_LENGTH, FINISH_STOP, SamplingParams, generate
from mindpretrain.validation import ConfigError
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
from research.deepseek3.generation import DeepseekV3CachedDecoder, cache_bytes_per_token
from research.deepseek3.hf_weights import load_hf_weights
from research.deepseek3.weight_mapping import hf_parameter_shapes

TOLERANCE = 1e-5
PROMPT_LENGTHS = (5, 9, 1, 7)
STEPS = 6
SEQ_LENGTH = 32

CASES = {
    # YaRN, q LoRA, interleaved RoPE, group routing, one dense layer
    "yarn_qlora": dict(),
    # plain RoPE, q_proj, half-split RoPE, every layer MoE
    "plain_qproj_halfsplit": dict(q_lora_rank=None, rope_scaling=None, rope_interleave=False,
                                  first_k_dense_replace=0, n_group=1, topk_group=1),
}


@pytest.fixture(scope="module", autouse=True)
def pynative_cpu():
    ms.set_context(mode=ms.PYNATIVE_MODE)


class Case:
    def __init__(self, tmp_path_factory, name, overrides):
        from hf_reference import build_tiny_hf_deepseek_v3

        self.hf, self.hf_dir = build_tiny_hf_deepseek_v3(tmp_path_factory.mktemp(name), **overrides)
        config = DeepseekV3Config.from_hf(self.hf_dir, compute_dtype="float32", seq_length=SEQ_LENGTH,
                                          seq_balance_loss_alpha=0.0, num_nextn_predict_layers=0)
        self.config = config
        self.model = DeepseekV3ForCausalLM(config)
        load_hf_weights(self.model, self.hf_dir, drop_mtp=True)
        rng = np.random.RandomState(len(name))
        self.prompts = [rng.randint(2, config.vocab_size, size=length).tolist() for length in PROMPT_LENGTHS]
        self.forced = rng.randint(2, config.vocab_size, size=(STEPS, len(PROMPT_LENGTHS))).astype(np.int32)

    def full_logits(self, sequences):
        """The model's full forward over each whole sequence, in one call: right padding cannot reach earlier
        positions through causal attention (and routing is per token), so row r's logits [:len] are its own."""
        width = max(len(sequence) for sequence in sequences)
        ids = np.array([sequence + [0] * (width - len(sequence)) for sequence in sequences], np.int32)
        return self.model(ms.Tensor(ids)).asnumpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    require_reference("torch")
    require_reference("transformers")
    return Case(tmp_path_factory, request.param, CASES[request.param])


def left_padded(prompts):
    width = max(len(prompt) for prompt in prompts)
    ids = np.full((len(prompts), width), 3, np.int32)          # a real token id as padding: the mask must hide it
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
    return ids, np.array([len(prompt) for prompt in prompts], np.int32)


def test_cached_steps_equal_full_forward(case):
    ids, lengths = left_padded(case.prompts)
    decoder = DeepseekV3CachedDecoder(case.model, len(case.prompts), ids.shape[1] + STEPS)
    steps = [decoder.prefill(ids, lengths)] + [decoder.step(case.forced[step]) for step in range(STEPS)]
    worst = 0.0
    full_rows = case.full_logits([prompt + case.forced[:, row].tolist() for row, prompt in enumerate(case.prompts)])
    for row, (prompt, full) in enumerate(zip(case.prompts, full_rows)):
        for step, logits in enumerate(steps):
            assert logits.dtype == np.float32
            worst = max(worst, float(np.abs(logits[row] - full[len(prompt) - 1 + step]).max()))
    print(f"cached vs full forward: max abs diff {worst:.3g}")
    assert worst <= TOLERANCE


def test_compiled_decoder_equals_full_forward(case):
    """GRAPH mode: the prefill and the step compile once each (the cache tuples are mutable inputs) and give the
    PyNative full forward's logits."""
    ids, lengths = left_padded(case.prompts)
    expected = case.full_logits([prompt + case.forced[:2, row].tolist() for row, prompt in enumerate(case.prompts)])
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        decoder = DeepseekV3CachedDecoder(case.model, len(case.prompts), ids.shape[1] + 2)
        steps = [decoder.prefill(ids, lengths), decoder.step(case.forced[0]), decoder.step(case.forced[1])]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    for row, prompt in enumerate(case.prompts):
        for step, logits in enumerate(steps):
            np.testing.assert_allclose(logits[row], expected[row, len(prompt) - 1 + step], rtol=0, atol=TOLERANCE)


def test_cache_holds_the_normalised_latent_and_rotated_rope_key(case):
    """Layer 0's cache at a row's real slots equals kv_a_layernorm(c) from the model's own cells (pad slots are
    written too, and masked); slots not yet reached stay zero; (kv_lora_rank + rope dim) per token per layer."""
    ids, lengths = left_padded(case.prompts)
    decoder = DeepseekV3CachedDecoder(case.model, len(case.prompts), ids.shape[1] + 2)
    decoder.prefill(ids, lengths)
    config = case.config
    assert len(decoder.latents) == len(decoder.ropes) == config.num_hidden_layers
    assert decoder.latents[0].shape == (len(case.prompts), ids.shape[1] + 2, config.kv_lora_rank)
    assert decoder.ropes[0].shape == (len(case.prompts), ids.shape[1] + 2, config.qk_rope_head_dim)
    assert cache_bytes_per_token(config) == (config.kv_lora_rank + config.qk_rope_head_dim) * 4 * 3
    layer = case.model.model.layers[0]
    row = 0
    prompt = ms.Tensor(np.asarray(case.prompts[row], np.int32)[None])
    compressed = layer.self_attn.kv_a_proj_with_mqa(layer.input_layernorm(case.model.model.embed_tokens(prompt)))
    latent = layer.self_attn.kv_a_layernorm(compressed[..., :config.kv_lora_rank]).asnumpy()[0]
    cached = decoder.latents[0].asnumpy()[row]
    pad = ids.shape[1] - lengths[row]
    np.testing.assert_allclose(cached[pad:ids.shape[1]], latent, atol=1e-6)
    assert pad > 0 and not cached[ids.shape[1]:].any()


def hf_greedy(hf, prompt, new_tokens, eos=None):
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                          eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_generate(case):
    """Greedy tokens of the mixed-length batch equal transformers' greedy generate of each prompt alone. EOS = the
    3rd free-running token of row 0: that row stops there with "stop" (EOS included); a greedy continuation does
    not depend on the EOS id, so transformers' stopped output is its free one cut after the first EOS."""
    new_tokens = 6
    free = [hf_greedy(case.hf, prompt, new_tokens) for prompt in case.prompts]
    eos = free[0][2]
    decoder = DeepseekV3CachedDecoder(case.model, len(case.prompts), max(PROMPT_LENGTHS) + new_tokens)
    results = generate(decoder, case.prompts, SamplingParams(max_new_tokens=new_tokens, eos_token_ids=(eos,)))
    for result, reference in zip(results, free):
        stopped = eos in reference
        assert result.tokens == (reference[:reference.index(eos) + 1] if stopped else reference)
        assert result.finish_reason == (FINISH_STOP if stopped else FINISH_LENGTH)
    assert results[0].tokens == free[0][:3] and results[0].finish_reason == FINISH_STOP
    assert hf_greedy(case.hf, case.prompts[0], new_tokens, eos=eos) == free[0][:3]


def test_a_fixed_prompt_width_changes_nothing_but_the_prefill_shape(case):
    """Left-padding every batch to one width (one compiled prefill shape, as GRPO rollouts do) gives the same
    greedy tokens and log-probs as padding to the batch's longest prompt."""
    new_tokens, width = 4, max(PROMPT_LENGTHS) + 3
    params = SamplingParams(max_new_tokens=new_tokens)
    tight = generate(DeepseekV3CachedDecoder(case.model, len(case.prompts), max(PROMPT_LENGTHS) + new_tokens),
                     case.prompts, params)
    wide = generate(DeepseekV3CachedDecoder(case.model, len(case.prompts), width + new_tokens), case.prompts, params,
                    prompt_width=width)
    for one, other in zip(tight, wide):
        assert one.tokens == other.tokens
        np.testing.assert_allclose(one.logprobs, other.logprobs, atol=1e-5)
    with pytest.raises(ConfigError, match="must hold the longest prompt"):
        generate(DeepseekV3CachedDecoder(case.model, len(case.prompts), width + new_tokens), case.prompts, params,
                 prompt_width=1)


def test_wrapping_keeps_parameter_names(case):
    DeepseekV3CachedDecoder(case.model, 2, 8)
    names = {name: tuple(param.shape) for name, param in case.model.parameters_and_names()}
    assert names == dict(hf_parameter_shapes(case.config))


def test_bad_calls_are_refused(case):
    decoder = DeepseekV3CachedDecoder(case.model, 2, 4)
    with pytest.raises(ConfigError, match="prefill"):
        decoder.step(np.array([1, 2]))
    with pytest.raises(ConfigError, match="lengths"):
        decoder.prefill(np.ones((2, 3), np.int32), np.array([3, 0]))
    with pytest.raises(ConfigError, match="ids"):
        decoder.prefill(np.ones((2, 5), np.int32), np.array([5, 5]))
    decoder.prefill(np.ones((2, 3), np.int32), np.array([3, 2]))
    decoder.step(np.array([1, 2]))
    with pytest.raises(ConfigError, match="full"):
        decoder.step(np.array([1, 2]))
    with pytest.raises(ConfigError, match="RoPE"):
        DeepseekV3CachedDecoder(case.model, 1, SEQ_LENGTH + 1)
