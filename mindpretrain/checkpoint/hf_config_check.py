"""Does an HF checkpoint's `config.json` describe the model the YAML builds?

Weights of the right shapes can still belong to another function: a release trained with YaRN rope scaling
loaded into a YAML without it, another `routed_scaling_factor`, `norm_topk_prob` or `rms_norm_eps`, would load
without a complaint and fine-tune a different model. So before loading, both sides go through the model
spec's own `config.json` writer (`spec.hf_config_dict`), the checkpoint's after `spec.config_from_hf`, and
every key whose value differs is named. Keys that do not change what the weights compute (the spec's
`hf_config_ignored`: e.g. initialisation range, token ids, the length bound) are left out, and so is the MTP
depth, which `--mtp` decides.
"""
import json
import math
import os

# Written by every spec's config.json writer, never a property of the weights.
ALWAYS_IGNORED = ("torch_dtype", "architectures", "use_cache", "transformers_version")


def _same(left, right):
    if isinstance(left, float) or isinstance(right, float):
        try:
            return math.isclose(float(left), float(right), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_same(left[key], right[key]) for key in left)
    return left == right


def hf_config_differences(spec, model_config, hf_dir, ignore=()):
    """["key: YAML value vs checkpoint value", ...] for every architectural key that differs ([] when none, or
    when `hf_dir` has no config.json: then the shape check is all there is)."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        return []
    ours = spec.hf_config_dict(model_config, "bfloat16")
    theirs = spec.hf_config_dict(spec.config_from_hf(hf_dir), "bfloat16")
    skipped = set(ALWAYS_IGNORED) | set(getattr(spec, "hf_config_ignored", None) or ()) | set(ignore)
    differences = []
    for key in sorted(set(ours) | set(theirs)):
        if key in skipped:
            continue
        if not _same(ours.get(key), theirs.get(key)):
            differences.append(f"{key}: YAML {json.dumps(ours.get(key))} vs checkpoint {json.dumps(theirs.get(key))}")
    return differences
