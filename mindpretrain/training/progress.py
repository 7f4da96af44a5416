"""What one training step looks like in the log: throughput, MFU, expert balance and ETA.

FLOPs per token come from the model's spec (`ModelSpec.planning.flops_per_token`, the one place the model's
arithmetic is counted, shared with the planner); MFU is achieved FLOP/s over the configured device peak
(`runner_config.device_peak_tflops`, per device) times the number of devices.
"""
import datetime
import math

import numpy as np

from mindpretrain.model_spec import spec_for_config
from mindpretrain.registry import RegistryError
from mindpretrain.utils.logging import get_logger

logger = get_logger("train")


def flops_per_token_or_none(model_config, seq_length):
    """Training FLOPs per token from the model's spec, or None when no spec with planner hooks is registered."""
    try:
        spec = spec_for_config(model_config)
    except RegistryError:
        return None
    if spec.planning is None:
        return None
    try:
        return float(spec.planning.flops_per_token(model_config, seq_length))
    except Exception as error:  # a cost model that cannot handle this config must not stop training
        logger.warning("MFU disabled: flops_per_token failed for this model (%s)", error)
        return None


def expert_imbalance(expert_load):
    """(max over layers, mean over layers) of max(load)/mean(load); 1.0 is perfect balance."""
    load = np.asarray(expert_load, dtype=np.float64)
    if load.size == 0:
        return None, None
    load = load.reshape(-1, load.shape[-1])
    means = load.mean(axis=1)
    ratios = np.where(means > 0, load.max(axis=1) / np.maximum(means, 1e-30), 1.0)
    return float(ratios.max()), float(ratios.mean())


def format_duration(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class StepTimer:
    """Step times with the first (compiling) steps kept out of the averages and the ETA."""

    def __init__(self, warmup_steps=1):
        self.warmup_steps = warmup_steps
        self.times = []

    def add(self, seconds):
        self.times.append(seconds)

    def steady_mean(self):
        steady = self.times[self.warmup_steps:] or self.times
        return float(np.mean(steady)) if steady else None

    def eta(self, remaining_steps):
        mean = self.steady_mean()
        return None if mean is None else mean * remaining_steps


def format_step_line(metrics):
    parts = [f"step {metrics['step']}/{metrics['total_steps']}",
             f"loss {metrics['loss']:.4f}",
             f"lm_loss {metrics['lm_loss']:.4f}",
             f"mtp_loss {metrics['mtp_loss']:.4f}",
             f"lr {metrics['lr']:.3e}",
             f"grad_norm {metrics['grad_norm']:.4f}",
             *([f"loss_scale {metrics['loss_scale']:g}"] if metrics.get("loss_scale") is not None else []),
             *([f"targets {metrics['target_tokens']}"] if metrics.get("target_tokens") is not None else []),
             f"tokens/s {metrics['tokens_per_second']:.0f}",
             f"step_time {metrics['step_time']:.3f}s"]
    mfu = metrics.get("mfu")
    parts.append(f"mfu {100 * mfu:.2f}%" if mfu is not None else "mfu n/a")
    if metrics.get("load_imbalance_max") is not None:
        parts.append(f"expert_load max/mean {metrics['load_imbalance_max']:.2f} "
                     f"(layer avg {metrics['load_imbalance_mean']:.2f})")
    parts.append(f"eta {format_duration(metrics.get('eta'))}")
    if metrics.get("overflow"):
        parts.append("SKIPPED (float16 gradient overflow: loss scale reduced)")
    elif metrics.get("skipped"):
        parts.append("SKIPPED (non-finite loss or gradient)")
    return " | ".join(parts)
