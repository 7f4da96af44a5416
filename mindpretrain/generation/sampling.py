"""Token sampling over any cached decoder: logits filters, seeded draws, stop rules, per-token log-probs.

The filters reproduce transformers' logits processors exactly (same masks, same tie rules), applied in the
order its `generate` applies them:

    repetition penalty (also when greedy)  ->  temperature  ->  top-k  ->  top-p     (the last three: sampling only)

* temperature: scores / T (skipped at T == 1);
* top-k: k = max(top_k, min_tokens_to_keep), at most the vocabulary; every score below the k-th largest is
  removed, so scores tied with the k-th are all kept (top_k == 0: off);
* top-p: scores sorted ascending, a token is removed when the probability mass up to and including it is
  <= 1 - top_p; the `min_tokens_to_keep` largest always stay (top_p == 1: off). The sort is stable, so of tied
  tokens straddling the cut the lower ids go first; transformers leaves that order to an unstable torch.sort
  (the number kept and their scores agree either way);
* repetition penalty: each token already in the row (prompt or generated; pads excluded) has its score divided
  by the penalty when positive, multiplied when negative.

Draws are seeded: one `numpy.random.Generator` per `generate` call, built from `seed` (an int or a sequence of
ints), draws one uniform per row per step and inverts the filtered distribution's CDF. The same seed, prompts,
parameters and model give the same tokens; the stream is NumPy's, not torch's, so it does not reproduce
transformers' samples token for token (greedy decoding does). Greedy (`do_sample=False`) takes the arg-max of
the penalised scores, the lowest token id among ties.

Each row reports its tokens (the EOS that stopped it included), the float32 log-probability of every token under
`log_softmax(logits / temperature)` of the unpenalised, unfiltered logits — what an RL trainer (GRPO, PPO)
recomputes from the same model — and why it ended: "stop" (an EOS id) or "length" (`max_new_tokens`).

The sampler drives a decoder through the small `CachedDecoder` interface below; a model plugin provides one
through its `ModelSpec.cached_decoder`.
"""
import dataclasses
from typing import List, NamedTuple, Sequence, Tuple, Union

import numpy as np

from mindpretrain.validation import require

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class CachedDecoder:
    """What `generate` needs from a model (a plugin implements it; this class only documents the contract).

    batch_size: rows of every call. max_length: positions the cache holds per row (prompt + generated).
    prefill(ids int32 [B, P] left-padded, lengths int [B]) -> float32 logits [B, vocab] of the next token
        (each row's prompt is ids[b, P - lengths[b]:]; its first real token is position 0).
    step(tokens int32 [B]) -> float32 logits [B, vocab] of the token after `tokens`, which extend every row
        by one position.
    """

    batch_size: int
    max_length: int

    def prefill(self, ids, lengths):
        raise NotImplementedError

    def step(self, tokens):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Field names and defaults are those of MindFormers' / transformers' GenerationConfig
    (top_k 50, top_p 1, temperature 1, greedy unless do_sample); `max_new_tokens` and `eos_token_ids` bound
    the length; `seed` seeds the draws."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_tokens_to_keep: int = 1
    repetition_penalty: float = 1.0
    max_new_tokens: int = 32
    eos_token_ids: Tuple[int, ...] = ()
    seed: Union[int, Sequence[int], None] = 0

    def __post_init__(self):
        require(isinstance(self.do_sample, bool), "do_sample", self.do_sample, "must be True or False")
        require(_is_number(self.temperature) and self.temperature > 0, "temperature", self.temperature,
                "must be a number > 0 (greedy decoding is do_sample: False)")
        require(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "must be an integer >= 0 (0: off)")
        require(_is_number(self.top_p) and 0 <= self.top_p <= 1, "top_p", self.top_p,
                "must be a number in [0, 1] (1: off)")
        require(_is_int(self.min_tokens_to_keep) and self.min_tokens_to_keep >= 1, "min_tokens_to_keep",
                self.min_tokens_to_keep, "must be an integer >= 1")
        require(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
                self.repetition_penalty, "must be a number > 0 (1: off)")
        require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens,
                "must be an integer >= 1")
        ids = self.eos_token_ids
        require(isinstance(ids, tuple) and all(_is_int(token) and token >= 0 for token in ids), "eos_token_id",
                ids, "must be a tuple of token ids >= 0")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class Completion(NamedTuple):
    """One row's result: generated token ids, their float32 log-probs, and "stop" | "length"."""

    tokens: List[int]
    logprobs: List[float]
    finish_reason: str


# ----- filters (numpy, [B, V] float32 in and out) ------------------------------------------------------------

def apply_temperature(scores, temperature):
    return scores if temperature == 1.0 else (scores / np.float32(temperature)).astype(np.float32)


def top_k_filter(scores, top_k, min_tokens_to_keep=1):
    """-inf below the k-th largest score of each row (ties with it kept); top_k 0: unchanged."""
    if top_k == 0:
        return scores
    vocab = scores.shape[-1]
    k = min(max(int(top_k), int(min_tokens_to_keep)), vocab)
    kth_largest = np.partition(scores, vocab - k, axis=-1)[..., vocab - k:vocab - k + 1]
    return np.where(scores < kth_largest, np.float32(-np.inf), scores).astype(np.float32)


def top_p_filter(scores, top_p, min_tokens_to_keep=1):
    """-inf for the tokens outside the nucleus: ascending stable sort, remove while cumulative mass <= 1 - top_p,
    keep the `min_tokens_to_keep` largest; top_p 1: unchanged."""
    if top_p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")
    cumulative = np.cumsum(softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
    remove_sorted = cumulative <= 1.0 - top_p
    remove_sorted[..., -int(min_tokens_to_keep):] = False
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores).astype(np.float32)


def penalise_repetitions(scores, seen, penalty):
    """scores [B, V]; seen bool [B, V] (tokens already in each row): positive scores / penalty, negative ones
    * penalty; penalty 1: unchanged."""
    if penalty == 1.0:
        return scores
    penalised = np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))
    return np.where(seen, penalised, scores).astype(np.float32)


def warp(scores, params):
    """Temperature, top-k, top-p, as sampling applies them (greedy decoding applies none)."""
    scores = apply_temperature(scores, params.temperature)
    scores = top_k_filter(scores, params.top_k, params.min_tokens_to_keep)
    return top_p_filter(scores, params.top_p, params.min_tokens_to_keep)


def softmax(scores):
    """Float64 softmax over the last axis (-inf entries get probability 0)."""
    shifted = scores.astype(np.float64) - np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(-1, keepdims=True)


def log_softmax(scores):
    """Float32 log_softmax over the last axis, reduced in float64."""
    shifted = scores.astype(np.float64) - np.max(scores, axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(np.float32)


def draw(filtered, rng):
    """One token per row from softmax(filtered): one uniform per row against the row's CDF."""
    cdf = np.cumsum(softmax(filtered), axis=-1)
    uniforms = rng.random(filtered.shape[0])[:, None] * cdf[:, -1:]
    picked = (cdf <= uniforms).sum(-1)            # the first index whose CDF exceeds the uniform
    return np.minimum(picked, filtered.shape[-1] - 1).astype(np.int32)


def choose(logits, seen, params, rng):
    """-> (tokens int32 [B], their float32 log-probs under log_softmax(logits / temperature))."""
    scores = penalise_repetitions(np.asarray(logits, dtype=np.float32), seen, params.repetition_penalty)
    if params.do_sample:
        tokens = draw(warp(scores, params), rng)
    else:
        tokens = np.argmax(scores, axis=-1).astype(np.int32)
    reference = log_softmax(apply_temperature(np.asarray(logits, dtype=np.float32), params.temperature))
    return tokens, reference[np.arange(tokens.shape[0]), tokens]


# ----- the loop ------------------------------------------------------------------------------------------------

def left_pad(prompts, pad_id=0, width=None):
    """Token-id lists -> (ids int32 [B, P] padded on the left with `pad_id`, lengths int32 [B]); P is the longest
    prompt, or `width` (at least that) so that every batch has one shape (one compiled prefill)."""
    require(len(prompts) > 0, "prompts", prompts, "must hold at least one prompt")
    lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int32)
    require(lengths.min() > 0, "prompts", [int(n) for n in lengths], "must all hold at least one token")
    require(width is None or width >= lengths.max(), "prompt width", width,
            f"must hold the longest prompt ({int(lengths.max())} tokens)")
    ids = np.full((len(prompts), int(width or lengths.max())), pad_id, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, ids.shape[1] - len(prompt):] = np.asarray(prompt, dtype=np.int32)
    return ids, lengths


def _seen_tokens(ids, lengths, vocab):
    """bool [B, V]: the tokens of each row's prompt (pads excluded)."""
    seen = np.zeros((ids.shape[0], vocab), dtype=bool)
    for row in range(ids.shape[0]):
        seen[row, ids[row, ids.shape[1] - lengths[row]:]] = True
    return seen


def generate(decoder, prompts, params, pad_id=0, prompt_width=None):
    """Sample up to `params.max_new_tokens` tokens after each prompt -> [Completion] in prompt order.

    `decoder` follows `CachedDecoder` with batch_size == len(prompts). Prompts are left-padded (to the longest,
    or to `prompt_width` for one prefill shape across calls) and prefilled in one call, then one `step` per new
    token for the whole batch; a finished row keeps stepping (its tokens are discarded) until every row has
    stopped or reached the length limit."""
    ids, lengths = left_pad(prompts, pad_id, prompt_width)
    rows = ids.shape[0]
    require(rows == decoder.batch_size, "prompts", rows, f"must number the decoder's batch size {decoder.batch_size}")
    needed = ids.shape[1] + params.max_new_tokens - 1            # the last token is never fed back
    require(needed <= decoder.max_length, "max_new_tokens", params.max_new_tokens,
            f"with the longest prompt ({ids.shape[1]} tokens) needs {needed} cache positions; the decoder holds "
            f"{decoder.max_length}")
    rng = np.random.default_rng(params.seed)
    eos = np.asarray(params.eos_token_ids, dtype=np.int64)
    logits = decoder.prefill(ids, lengths)
    seen = _seen_tokens(ids, lengths, logits.shape[-1])
    tokens, logprobs = [[] for _ in range(rows)], [[] for _ in range(rows)]
    reasons = [None] * rows
    for step in range(params.max_new_tokens):
        chosen, chosen_logprobs = choose(logits, seen, params, rng)
        for row in range(rows):
            if reasons[row] is None:
                tokens[row].append(int(chosen[row]))
                logprobs[row].append(float(chosen_logprobs[row]))
                seen[row, chosen[row]] = True
                if np.isin(chosen[row], eos):
                    reasons[row] = FINISH_STOP
        if all(reason is not None for reason in reasons) or step == params.max_new_tokens - 1:
            break
        logits = decoder.step(chosen)
    return [Completion(tokens[row], logprobs[row], reasons[row] or FINISH_LENGTH) for row in range(rows)]
