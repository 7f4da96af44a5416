"""Rollouts for GRPO: n sampled responses per prompt from the policy being trained, and their training rows.

The sampler decodes with the training model's own Parameters (colocated: an update is visible to the next
rollout at once, nothing is copied). One decoder of `decode_batch_size` rows is built once and reused (its
compiled prefill/step graphs too); the last chunk of a batch is filled with copies of its first prompt,
whose results are dropped. Every draw is seeded from (seed, step, round, rank, chunk), so a resumed run
samples exactly what the uninterrupted one would, without storing any generator state.
"""
import dataclasses
from typing import List

import numpy as np

from mindpretrain.generation.sampling import FINISH_LENGTH, SamplingParams, generate


@dataclasses.dataclass
class Sample:
    """One response to one prompt: group = the prompt's position in this rank's batch (n contiguous)."""
    group: int
    prompt_index: int
    prompt_ids: List[int]
    response_ids: List[int]
    logprobs: List[float]
    finish_reason: str
    label: str
    text: str = ""
    reward: float = 0.0

    @property
    def truncated(self):
        return self.finish_reason == FINISH_LENGTH


def sampling_params(rollout_config, eos_ids, seed):
    """The rollout's SamplingParams (verl's names: temperature, top_k 0/-1 off, top_p 1 off)."""
    return SamplingParams(do_sample=True, temperature=rollout_config.temperature, top_k=rollout_config.top_k,
                          top_p=rollout_config.top_p, max_new_tokens=rollout_config.max_response_length,
                          eos_token_ids=tuple(eos_ids), seed=seed)


def sample_groups(decoder, records, n, params_for_chunk, pad_id=0, prompt_width=None):
    """`n` responses to each PromptRecord (groups contiguous, in record order) -> [Sample].

    `params_for_chunk(chunk_index)` gives the SamplingParams of each decoder call (its seed); prompts are
    left-padded to `prompt_width` (the longest allowed prompt: one compiled prefill for every step)."""
    rows = [(group, record) for group, record in enumerate(records) for _ in range(n)]
    samples, width = [], decoder.batch_size
    for chunk, start in enumerate(range(0, len(rows), width)):
        part = rows[start:start + width]
        prompts = [record.ids for _, record in part]
        prompts += [prompts[0]] * (width - len(prompts))
        completions = generate(decoder, prompts, params_for_chunk(chunk), pad_id, prompt_width)
        for (group, record), completion in zip(part, completions):
            samples.append(Sample(group, record.index, list(record.ids), list(completion.tokens),
                                  list(completion.logprobs), completion.finish_reason, record.label))
    return samples


def training_rows(samples, length, pad_id=0):
    """Samples -> right-padded arrays [N, length]: input_ids, labels (the next token), response_mask (1 where
    the label is a response token) and the sampler's log-probs at those positions."""
    count = len(samples)
    input_ids = np.full((count, length), pad_id, np.int32)
    labels = np.full((count, length), pad_id, np.int32)
    mask = np.zeros((count, length), np.float32)
    rollout_logp = np.zeros((count, length), np.float32)
    for row, sample in enumerate(samples):
        tokens = sample.prompt_ids + sample.response_ids
        if len(tokens) > length:
            raise ValueError(f"sample of {len(tokens)} tokens exceeds the training length {length}")
        input_ids[row, :len(tokens)] = tokens
        labels[row, :len(tokens) - 1] = tokens[1:]
        first, responses = len(sample.prompt_ids) - 1, len(sample.response_ids)
        mask[row, first:first + responses] = 1.0
        rollout_logp[row, first:first + responses] = sample.logprobs
    return input_ids, labels, mask, rollout_logp


def group_reward_std(rewards, n):
    """Per group (n contiguous samples) the reward std (unbiased, 0 for n == 1): dynamic sampling drops
    groups whose std is <= 1e-6 (every response scored the same, no learning signal)."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, n)
    return grouped.std(1, ddof=1) if n > 1 else np.zeros(grouped.shape[0])
