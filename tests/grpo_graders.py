"""Graders for GRPO tests, importable by the reward worker as `grpo_graders:<name>` (tests/ is on its path)."""


def digit_share(response, ground_truth, **_):
    """The share of the response's characters that are digits: a reward a freshly initialised policy already
    varies on, so a short test run has a learning signal."""
    return sum(char.isdigit() for char in response) / max(len(response), 1)
