"""What a training run reports, and where: one metrics dict per step, the end-of-run summary.

Each step's dict goes to the trainer's history, to `<output_dir>/metrics/rank_<r>.jsonl` (one JSON
line per step with exact floats, for tools and tests; every rank writes its own file), to the log
(`progress.format_step_line`, every `MFLossMonitor.per_print_times` steps, the last step and every
skipped step) and, on rank 0 when `tensorboard.tensorboard_dir` is set, to TensorBoard scalars.
"""
import json
import os

from mindpretrain.training.progress import StepTimer, expert_imbalance, format_duration, format_step_line
from mindpretrain.utils.logging import get_logger

logger = get_logger("train")

TENSORBOARD_KEYS = ("loss", "lm_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_second", "loss_scale")


def peak_flops(device_peak_tflops, device, devices):
    """Peak FLOP/s of `devices` devices: `runner_config.device_peak_tflops` per device, or the planning
    cost model's table entry for `runner_config.device` (e.g. atlas-800t-a2); None when neither is known."""
    if device_peak_tflops:
        return float(device_peak_tflops) * 1e12 * devices
    if device:
        try:
            from mindpretrain.planning.cost_model import device_peak_flops
        except ImportError:
            return None
        peak = device_peak_flops(device)
        return peak * devices if peak else None
    return None


class MetricsLogger:
    """The reporting of one `Trainer.train` call. `history` is the trainer's list, appended to in place."""

    def __init__(self, output_dir, process_rank, total_steps, tokens_per_step, history, log_interval=1,
                 loss_scaling=False, flops_per_token=None, peak=None, tensorboard_dir=None):
        self.path = os.path.join(output_dir, "metrics", f"rank_{process_rank}.jsonl")
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.history, self.log_interval, self.loss_scaling = history, log_interval, loss_scaling
        self.flops_per_token, self.peak = flops_per_token, peak
        self.timer = StepTimer(warmup_steps=1)
        self._jsonl = None   # opened at the first step, so a run that trains no step writes no file
        self.writer = None
        if tensorboard_dir and process_rank == 0:
            from mindpretrain.training.tensorboard import ScalarWriter

            self.writer = ScalarWriter(tensorboard_dir)

    def step_metrics(self, outcome, step, consumed_samples, step_time):
        """The metrics dict of a finished step (`outcome`: the trainer's StepOutcome)."""
        self.timer.add(step_time)
        tokens_per_second = self.tokens_per_step / step_time if step_time > 0 else float("nan")
        mfu = None
        if self.flops_per_token and self.peak:
            mfu = tokens_per_second * self.flops_per_token / self.peak
        imbalance_max, imbalance_mean = expert_imbalance(outcome.expert_load)
        scale = {"loss_scale": outcome.loss_scale, "overflow": outcome.overflow} if self.loss_scaling else {}
        losses = outcome.losses
        return {**scale, "step": step, "total_steps": self.total_steps, "loss": float(losses[0]),
                "lm_loss": float(losses[1]), "mtp_loss": float(losses[2]), "balance_loss": float(losses[3]),
                "lr": outcome.lr, "grad_norm": outcome.grad_norm, "tokens_per_second": tokens_per_second,
                "step_time": step_time, "mfu": mfu, "load_imbalance_max": imbalance_max,
                "load_imbalance_mean": imbalance_mean, "eta": self.timer.eta(self.total_steps - step),
                "skipped": not outcome.finite, "consumed_samples": consumed_samples,
                "target_tokens": outcome.target_tokens}

    def write(self, metrics):
        """Report one step's dict: history, JSONL, the log line when due, TensorBoard."""
        self.history.append(metrics)
        if self._jsonl is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._jsonl = open(self.path, "a", encoding="utf-8")
        self._jsonl.write(json.dumps(metrics) + "\n")
        self._jsonl.flush()
        step = metrics["step"]
        if step % self.log_interval == 0 or step == self.total_steps or metrics["skipped"]:
            logger.info("%s", format_step_line(metrics))
        if self.writer is not None:
            self.writer.add_scalars({key: metrics[key] for key in TENSORBOARD_KEYS if metrics.get(key) is not None},
                                    step)

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.writer is not None:
            self.writer.close()

    def summary(self, status, step, first_step, elapsed, skipped_steps, consumed_samples):
        """The end-of-run dict; its `line` is what the trainer logs last."""
        ran = [m for m in self.history if m["step"] > first_step]
        mean_step = self.timer.steady_mean()
        tokens_per_second = (self.tokens_per_step / mean_step) if mean_step else None
        summary = {"status": status, "steps": step, "total_steps": self.total_steps, "elapsed": elapsed,
                   "first_loss": ran[0]["loss"] if ran else None, "last_loss": ran[-1]["loss"] if ran else None,
                   "mean_step_time": mean_step, "tokens_per_second": tokens_per_second,
                   "skipped_steps": skipped_steps, "consumed_samples": consumed_samples}
        first = f"{summary['first_loss']:.4f}" if ran else "n/a"
        last = f"{summary['last_loss']:.4f}" if ran else "n/a"
        speed = f"{tokens_per_second:.0f} tokens/s, {mean_step:.3f} s/step" if mean_step else "n/a"
        summary["line"] = (f"training {status}: step {step}/{self.total_steps}, loss {first} -> {last}, "
                           f"{speed} (steady state), {skipped_steps} skipped steps, "
                           f"{consumed_samples} samples, wall time {format_duration(elapsed)}")
        return summary
