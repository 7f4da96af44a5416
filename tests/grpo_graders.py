"""Graders for GRPO tests, importable by the reward worker as `grpo_graders:<name>` (tests/ is on its path)."""


def digit_share(response, ground_truth, **_):
    """The share of the response's characters that are digits: a reward a freshly initialised policy already
    varies on, so a short test run has a learning signal."""
    return sum(char.isdigit() for char in response) / max(len(response), 1)


def odd_labels_only(response, ground_truth, **_):
    """`digit_share` for prompts with an odd label, 0 for the others: the even-label groups carry no signal, which
    dynamic sampling must filter out."""
    return digit_share(response, ground_truth) if int(ground_truth) % 2 else 0.0


def overflowing(response, ground_truth, **_):
    """`digit_share` scaled to near float32's largest value: without std normalisation the advantages, and so the
    gradient norm, overflow — a deterministic non-finite update."""
    return 3.0e38 * digit_share(response, ground_truth)
