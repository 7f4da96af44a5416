"""Learning-rate schedules under MindFormers' YAML names, as plain functions of the global step.

The trainer evaluates the schedule in Python and feeds the rate to the compiled optimizer step
as a tensor, so a schedule never forces a graph recompile and the logged rate is exactly the one
applied. `lr(step)` is the rate used by the update of 0-based global step `step`; warmup ramps
linearly from `warmup_lr_init` (MindFormers' and Megatron's convention: step 0 uses the initial
rate) and ends at `warmup_steps`, after which the decay runs over the remaining steps.

`warmup_ratio` follows MindFormers' trainer (`create_lr_scheduler`): it takes precedence over
`warmup_steps`, and the warmup is `int(run_steps * warmup_ratio)` steps, where `run_steps` is the length of
the run (MindFormers' epochs x dataset size; here `runner_config.train_steps` or the epochs of the dataset),
even when `total_steps` names a different decay length. `int` truncates, as there: 0.29 x 100 is 28 steps.

    lr_schedule:
      type: CosineWithWarmUpLR
      learning_rate: 3.e-4
      warmup_ratio: 0.01        # or warmup_steps: 100
      lr_end: 3.e-5
      total_steps: -1           # -1 / null: the run's number of steps
"""
import math

from mindpretrain.validation import require
from mindpretrain.registry import register


class WarmUpLR:
    """Linear warmup shared by every schedule; subclasses define the rate after warmup."""

    def __init__(self, learning_rate, warmup_steps=None, warmup_lr_init=0.0, warmup_ratio=None,
                 total_steps=None, **unused):
        require(isinstance(learning_rate, (int, float)) and learning_rate >= 0, "lr_schedule.learning_rate",
                learning_rate, "must be a non-negative number")
        if unused:
            require(False, "lr_schedule", sorted(unused), f"are unknown keys for {type(self).__name__}")
        if total_steps is not None and total_steps < 0:
            total_steps = None
        self.learning_rate = float(learning_rate)
        self.warmup_lr_init = float(warmup_lr_init)
        self.total_steps = total_steps
        self.warmup_ratio = warmup_ratio
        self._warmup_steps = warmup_steps
        self.run_steps = None
        if warmup_ratio is not None:
            require(isinstance(warmup_ratio, (int, float)) and not isinstance(warmup_ratio, bool)
                    and 0 <= warmup_ratio <= 1, "lr_schedule.warmup_ratio", warmup_ratio, "must be a number in [0, 1]")
        if warmup_steps is not None:
            require(isinstance(warmup_steps, int) and warmup_steps >= 0, "lr_schedule.warmup_steps",
                    warmup_steps, "must be a non-negative integer")

    def set_total_steps(self, total_steps):
        """Called by the trainer with the length of the run: `total_steps: -1/null` in YAML means that length,
        and `warmup_ratio` is a fraction of it."""
        if total_steps is None:   # the run's length is not known yet (e.g. a planning tool)
            return
        self.run_steps = int(total_steps)
        if self.total_steps is None:
            self.total_steps = int(total_steps)

    @property
    def warmup_steps(self):
        if self.warmup_ratio is not None:
            run_steps = self.total_steps if self.run_steps is None else self.run_steps
            require(run_steps is not None, "lr_schedule.warmup_ratio", self.warmup_ratio,
                    "needs the length of the run (runner_config.train_steps or lr_schedule.total_steps)")
            return int(run_steps * self.warmup_ratio)
        return self._warmup_steps or 0

    def __call__(self, step):
        warmup = self.warmup_steps
        if step < warmup:
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * step / warmup
        return self.after_warmup(step - warmup, warmup)

    def decay_progress(self, step_after_warmup, warmup):
        require(self.total_steps is not None, "lr_schedule.total_steps", self.total_steps,
                f"must be known for {type(self).__name__}")
        decay_steps = max(1, self.total_steps - warmup)
        return min(1.0, step_after_warmup / decay_steps)

    def after_warmup(self, step_after_warmup, warmup):
        raise NotImplementedError


@register("lr_schedule")
class ConstantWarmUpLR(WarmUpLR):
    """Linear warmup, then constant `learning_rate`."""

    def after_warmup(self, step_after_warmup, warmup):
        return self.learning_rate


@register("lr_schedule")
class LinearWithWarmUpLR(WarmUpLR):
    """Linear warmup, then linear decay to `lr_end` at `total_steps`."""

    def __init__(self, learning_rate, lr_end=0.0, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.lr_end = float(lr_end)

    def after_warmup(self, step_after_warmup, warmup):
        progress = self.decay_progress(step_after_warmup, warmup)
        return self.learning_rate + (self.lr_end - self.learning_rate) * progress


@register("lr_schedule")
class CosineWithWarmUpLR(WarmUpLR):
    """Linear warmup, then cosine decay to `lr_end` (`num_cycles: 0.5` = half a cosine wave)."""

    def __init__(self, learning_rate, lr_end=0.0, num_cycles=0.5, decay_steps=None, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.lr_end = float(lr_end)
        self.num_cycles = float(num_cycles)
        self.decay_steps = decay_steps

    def decay_progress(self, step_after_warmup, warmup):
        if self.decay_steps:
            return min(1.0, step_after_warmup / self.decay_steps)
        return super().decay_progress(step_after_warmup, warmup)

    def after_warmup(self, step_after_warmup, warmup):
        progress = self.decay_progress(step_after_warmup, warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress))
        return self.lr_end + (self.learning_rate - self.lr_end) * max(0.0, cosine)


def build_lr_schedule(section, total_steps):
    """The schedule named by the YAML `lr_schedule` section (default: constant learning rate)."""
    from mindpretrain import registry

    schedule = registry.build("lr_schedule", dict(section))
    schedule.set_total_steps(total_steps)
    schedule.warmup_steps  # validates warmup_ratio against total_steps now, not at step 0
    return schedule
