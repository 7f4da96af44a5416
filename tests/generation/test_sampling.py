"""The model-independent sampler against transformers' logits processors (torch), brute-force frequencies and a
bigram-table decoder whose next-token logits are known exactly.

Filters: temperature, top-k, top-p and the repetition penalty equal transformers' TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper and RepetitionPenaltyLogitsProcessor on random logits full of ties (top-k: the
same mask; top-p: transformers orders tied scores by an unstable torch.sort, so tied tokens straddling the cut
may be swapped — the count kept and the kept scores are compared there). Sampling: draws follow the filtered
distribution, the same seed repeats, another seed differs; EOS ends a row with "stop", the limit with "length";
log-probs are log_softmax(logits / T) of the unfiltered logits.
"""
import numpy as np
import pytest

from conftest import require_reference
from mindpretrain.generation import sampling
from mindpretrain.generation.sampling import FINISH_LENGTH, FINISH_STOP, SamplingParams, generate
from mindpretrain.validation import ConfigError

VOCAB = 40


def tied_logits(seed, rows=8, vocab=VOCAB):
    """Random logits on a coarse grid (steps of 0.5), so most rows hold many ties."""
    rng = np.random.RandomState(seed)
    return (np.round(rng.randn(rows, vocab) * 4) / 2).astype(np.float32)


def hf_warp(logits, temperature=1.0, top_k=0, top_p=1.0, min_tokens_to_keep=1):
    torch = require_reference("torch")
    require_reference("transformers")
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep))
    scores = torch.tensor(logits)
    return warpers(torch.zeros((logits.shape[0], 1), dtype=torch.long), scores).numpy()


@pytest.mark.parametrize("top_k", [1, 3, 7, VOCAB, VOCAB + 5])
@pytest.mark.parametrize("min_keep", [1, 5])
def test_top_k_equals_transformers_with_ties(top_k, min_keep):
    logits = tied_logits(top_k + 10 * min_keep)
    ours = sampling.top_k_filter(logits, top_k, min_keep)
    reference = hf_warp(logits, top_k=top_k, min_tokens_to_keep=min_keep)
    np.testing.assert_array_equal(ours, reference)
    kept = np.isfinite(ours).sum(-1)
    assert kept.min() >= min(max(top_k, min_keep), VOCAB)
    if top_k < VOCAB:
        assert kept.max() > max(top_k, min_keep), "no row had a tie at the k-th score: the case is not covered"


def _assert_same_nucleus(logits, ours, reference):
    """Same kept count and the same kept scores per row; the same mask where no tie straddles the cut.
    Returns the number of rows where one did (tied tokens on both sides of the cut)."""
    straddled = 0
    for row_logits, row_ours, row_ref in zip(logits, ours, reference):
        kept_ours, kept_ref = np.isfinite(row_ours), np.isfinite(row_ref)
        assert kept_ours.sum() == kept_ref.sum()
        np.testing.assert_array_equal(np.sort(row_ours[kept_ours]), np.sort(row_ref[kept_ref]))
        cut = row_logits[kept_ours].min()
        if np.any(row_logits[~kept_ours] == cut):
            straddled += 1
        else:
            np.testing.assert_array_equal(kept_ours, kept_ref)
    return straddled


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.75, 0.95, 0.999])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_top_p_equals_transformers_with_ties(top_p, min_keep):
    logits = tied_logits(int(top_p * 1000) + min_keep, rows=16)
    ours = sampling.top_p_filter(logits, top_p, min_keep)
    reference = hf_warp(logits, top_p=top_p, min_tokens_to_keep=min_keep)
    _assert_same_nucleus(logits, ours, reference)
    assert np.isfinite(ours).sum(-1).min() >= min_keep


def test_top_p_ties_at_the_cut_remove_the_lower_token_id_first():
    """A tie straddling the cut: the kept count is transformers', and of the tied tokens the higher ids stay."""
    logits = np.log(np.array([[0.1, 0.3, 0.3, 0.3]], dtype=np.float32))
    ours = sampling.top_p_filter(logits, 0.5)                   # mass 0.3 + 0.3 >= 0.5: two of the three ties
    reference = hf_warp(logits, top_p=0.5)
    assert _assert_same_nucleus(logits, ours, reference) == 1
    assert np.isfinite(ours[0]).tolist() == [False, False, True, True]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 10, 0.8), (1.3, 0, 0.9), (0.5, 4, 1.0), (2.0, 25, 0.5)])
def test_temperature_top_k_top_p_chain_equals_transformers(temperature, top_k, top_p):
    logits = tied_logits(int(temperature * 10) + top_k)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    ours = sampling.warp(logits, params)
    reference = hf_warp(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    _assert_same_nucleus(logits, ours, reference)
    finite = np.isfinite(reference)
    np.testing.assert_allclose(np.sort(ours[np.isfinite(ours)]), np.sort(reference[finite]), rtol=1e-6)


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.5])
def test_repetition_penalty_equals_transformers(penalty):
    torch = require_reference("torch")
    require_reference("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.RandomState(3)
    logits = rng.randn(4, VOCAB).astype(np.float32)
    history = rng.randint(0, VOCAB, size=(4, 12))
    seen = np.zeros((4, VOCAB), dtype=bool)
    np.put_along_axis(seen, history, True, axis=-1)
    reference = RepetitionPenaltyLogitsProcessor(float(penalty))(torch.tensor(history), torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(sampling.penalise_repetitions(logits, seen, penalty), reference)


def test_draws_follow_the_filtered_distribution():
    """20000 draws of one row: frequencies match softmax of transformers' filtered scores; filtered tokens never
    appear."""
    torch = require_reference("torch")
    logits = np.tile(np.random.RandomState(5).randn(1, VOCAB).astype(np.float32) * 2, (20000, 1))
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=12, top_p=0.9)
    draws = sampling.draw(sampling.warp(logits, params), np.random.default_rng(0))
    expected = torch.softmax(torch.tensor(hf_warp(logits[:1], 0.8, 12, 0.9)), -1).numpy()[0]
    frequencies = np.bincount(draws, minlength=VOCAB) / len(draws)
    assert np.all(frequencies[expected == 0] == 0)
    assert np.abs(frequencies - expected).max() < 0.015


class BigramDecoder:
    """A decoder whose next-token logits are `table[last token]`: known exactly, cheap, model-free."""

    def __init__(self, table, batch_size, max_length):
        self.table, self.batch_size, self.max_length = table, batch_size, max_length
        self.calls = []

    def prefill(self, ids, lengths):
        self.calls.append(("prefill", ids.copy(), np.asarray(lengths).copy()))
        return self.table[ids[:, -1]]

    def step(self, tokens):
        self.calls.append(("step", np.asarray(tokens).copy()))
        return self.table[np.asarray(tokens)]


def bigram_table(seed=0, vocab=VOCAB, scale=1.0):
    return (np.random.RandomState(seed).randn(vocab, vocab) * scale).astype(np.float32)


PROMPTS = [[3, 4, 5], [7], [9, 10, 11, 12, 13], [2, 2]]


def test_left_padding_and_call_sequence():
    decoder = BigramDecoder(bigram_table(), len(PROMPTS), 16)
    generate(decoder, PROMPTS, SamplingParams(max_new_tokens=3), pad_id=0)
    kind, ids, lengths = decoder.calls[0]
    assert kind == "prefill" and ids.shape == (4, 5) and lengths.tolist() == [3, 1, 5, 2]
    assert ids[1].tolist() == [0, 0, 0, 0, 7] and ids[0].tolist() == [0, 0, 3, 4, 5]
    assert [call[0] for call in decoder.calls] == ["prefill", "step", "step"]     # the last token is not fed


def test_greedy_is_argmax_and_logprobs_are_log_softmax_over_temperature():
    torch = require_reference("torch")
    table = bigram_table(1)
    params = SamplingParams(do_sample=False, temperature=0.7, max_new_tokens=6)
    results = generate(BigramDecoder(table, 4, 16), PROMPTS, params)
    reference = torch.log_softmax(torch.tensor(table) / 0.7, -1).numpy()
    for prompt, result in zip(PROMPTS, results):
        previous = [prompt[-1]] + result.tokens[:-1]
        assert result.tokens == [int(np.argmax(table[token])) for token in previous]
        expected = [reference[before, token] for before, token in zip(previous, result.tokens)]
        assert all(isinstance(value, float) for value in result.logprobs)
        np.testing.assert_allclose(result.logprobs, expected, rtol=0, atol=1e-6)
        assert result.finish_reason == FINISH_LENGTH and len(result.tokens) == 6


def test_sampled_logprobs_ignore_the_filters():
    torch = require_reference("torch")
    table = bigram_table(2, scale=2.0)
    params = SamplingParams(do_sample=True, temperature=1.4, top_k=3, top_p=0.8, max_new_tokens=8, seed=11)
    results = generate(BigramDecoder(table, 4, 16), PROMPTS, params)
    reference = torch.log_softmax(torch.tensor(table) / 1.4, -1).numpy()
    for prompt, result in zip(PROMPTS, results):
        previous = [prompt[-1]] + result.tokens[:-1]
        np.testing.assert_allclose(result.logprobs, [reference[a, b] for a, b in zip(previous, result.tokens)],
                                   atol=1e-6)
        for before, token in zip(previous, result.tokens):       # every token lies in its step's top-3
            assert token in np.argsort(table[before])[-3:]


def test_same_seed_same_tokens_other_seed_other_tokens():
    table = bigram_table(3, scale=0.3)                       # nearly flat: draws are far from deterministic
    def run(seed):
        params = SamplingParams(do_sample=True, top_k=0, max_new_tokens=12, seed=seed)
        return [result.tokens for result in generate(BigramDecoder(table, 4, 32), PROMPTS, params)]
    assert run(7) == run(7)
    assert run((7, 1)) == run((7, 1))
    assert run(7) != run(8) and run(7) != run((7, 1))


def test_eos_stops_a_row_and_finish_reasons():
    """Token 5 is followed by EOS 30 for sure, token 30 by EOS 31; other rows run to the limit."""
    table = bigram_table(4)
    table[:, 30:] = -50.0
    table[5, 30] = 50.0                       # after 5: EOS 30
    table[13, 31] = 50.0                      # after 13: EOS 31 (a second EOS id)
    params = SamplingParams(do_sample=True, top_k=0, max_new_tokens=5, eos_token_ids=(30, 31), seed=0)
    decoder = BigramDecoder(table, 4, 16)
    results = generate(decoder, PROMPTS, params)
    assert results[0].tokens == [30] and results[0].finish_reason == FINISH_STOP
    assert results[2].tokens == [31] and results[2].finish_reason == FINISH_STOP
    for result in (results[1], results[3]):
        assert len(result.tokens) == 5 and result.finish_reason == FINISH_LENGTH
        assert not set(result.tokens) & {30, 31}


def test_all_rows_stopped_ends_the_loop_early():
    table = bigram_table(5)
    table[:, 20] = 100.0                      # EOS certain at once
    decoder = BigramDecoder(table, 4, 16)
    results = generate(decoder, PROMPTS, SamplingParams(max_new_tokens=8, eos_token_ids=(20,)))
    assert [result.tokens for result in results] == [[20]] * 4
    assert {result.finish_reason for result in results} == {FINISH_STOP}
    assert [call[0] for call in decoder.calls] == ["prefill"]


def test_bad_parameters_and_capacity_name_the_key():
    for key, value in (("temperature", 0.0), ("top_k", -1), ("top_p", 1.5), ("max_new_tokens", 0),
                       ("min_tokens_to_keep", 0), ("repetition_penalty", 0), ("do_sample", "yes")):
        with pytest.raises(ConfigError, match=key):
            SamplingParams(**{key: value})
    with pytest.raises(ConfigError, match="eos_token_id"):
        SamplingParams(eos_token_ids=(-1,))
    with pytest.raises(ConfigError, match="cache positions"):
        generate(BigramDecoder(bigram_table(), 4, 6), PROMPTS, SamplingParams(max_new_tokens=3))
    with pytest.raises(ConfigError, match="batch size"):
        generate(BigramDecoder(bigram_table(), 3, 16), PROMPTS, SamplingParams())
    with pytest.raises(ConfigError, match="at least one token"):
        generate(BigramDecoder(bigram_table(), 2, 16), [[1], []], SamplingParams())
