"""Loss scaling for float16 compute, configured as in MindFormers' `runner_wrapper.scale_sense`.

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero and above 65504 become inf. The
loss is multiplied by `scale` before the backward pass, so small gradients survive in float16, and
the gradients are divided by it again (in float32, before the norm and clipping). When the scaled
backward overflows, the step is skipped and the scale shrinks; after `scale_window` clean steps in
a row it grows again. The rule is MindSpore's `nn.DynamicLossScaleUpdateCell`
(mindspore/nn/wrap/loss_scale.py), kept here in Python because the trainer already decides
"apply or skip" on the host from rank-reduced numbers, so every rank takes the same decision:

- overflow: `scale = max(scale / scale_factor, 1)`, the clean-step count restarts;
- clean step: the count goes up; when it reaches `scale_window` the scale is multiplied by
  `scale_factor` and the count restarts (MindSpore grows at the `scale_window`-th clean step).

YAML (MindFormers' keys):

    runner_wrapper:
      type: MFTrainOneStepCell
      scale_sense:                       # dynamic
        type: DynamicLossScaleUpdateCell
        loss_scale_value: 65536
        scale_factor: 2
        scale_window: 1000
      # or  scale_sense: 1024            # a fixed scale (overflowing steps are skipped, scale kept)
      # or  scale_sense: {type: FixedLossScaleUpdateCell, loss_scale_value: 1024}

`scale_sense` absent or 1.0 means no loss scaling: the train step is compiled exactly as without
this module (bfloat16 and float32 runs need none). The scale and the clean-step count are part of
the checkpointed trainer state, so a resumed run rescales exactly as an uninterrupted one.
"""
import dataclasses
import numbers

from mindpretrain.validation import require
from mindpretrain.utils.logging import get_logger

logger = get_logger("loss_scale")

DYNAMIC = "DynamicLossScaleUpdateCell"
FIXED = ("FixedLossScaleUpdateCell", "ConstantLossScaleUpdateCell")
MINIMUM_SCALE = 1.0


@dataclasses.dataclass
class LossScaler:
    """Host-side loss scale: `scale` to multiply the loss by, `update(overflow)` after each step."""

    scale: float
    scale_factor: float = 2.0
    scale_window: int = 1000
    dynamic: bool = True
    clean_steps: int = 0     # steps without overflow since the last overflow or growth

    def update(self, overflow):
        """Apply one step's outcome; returns the new scale."""
        if not self.dynamic:
            return self.scale
        if overflow:
            self.scale = max(self.scale / self.scale_factor, MINIMUM_SCALE)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.scale_window:
                self.scale = self.scale * self.scale_factor
                self.clean_steps = 0
        return self.scale

    @property
    def at_minimum(self):
        """True when an overflow can no longer be answered by shrinking the scale."""
        return not self.dynamic or self.scale <= MINIMUM_SCALE

    def state_dict(self):
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.clean_steps = int(state.get("clean_steps", 0))


def _positive_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0


def build_loss_scaler(runner_wrapper, compute_dtype=None):
    """The LossScaler that `runner_wrapper.scale_sense` asks for, or None (no loss scaling)."""
    sense = (runner_wrapper or {}).get("scale_sense")
    scaler = None
    if sense is None:
        pass
    elif isinstance(sense, dict):
        section = dict(sense)
        kind = section.pop("type", DYNAMIC)
        require(kind == DYNAMIC or kind in FIXED, "runner_wrapper.scale_sense.type", kind,
                f"must be {DYNAMIC} or {FIXED[0]}")
        value = section.pop("loss_scale_value", None)
        require(_positive_number(value), "runner_wrapper.scale_sense.loss_scale_value", value,
                "must be a positive number")
        if kind == DYNAMIC:
            factor = section.pop("scale_factor", 2)
            window = section.pop("scale_window", 1000)
            require(_positive_number(factor) and factor > 1, "runner_wrapper.scale_sense.scale_factor", factor,
                    "must be a number greater than 1")
            require(isinstance(window, int) and not isinstance(window, bool) and window >= 1,
                    "runner_wrapper.scale_sense.scale_window", window, "must be a positive integer")
            scaler = LossScaler(float(value), float(factor), int(window), dynamic=True)
        else:
            scaler = LossScaler(float(value), dynamic=False)
        require(not section, "runner_wrapper.scale_sense", sorted(section), f"are unknown keys for {kind}")
    else:
        require(_positive_number(sense), "runner_wrapper.scale_sense", sense,
                "must be a positive number or a {type: DynamicLossScaleUpdateCell, ...} section")
        if float(sense) != 1.0:
            scaler = LossScaler(float(sense), dynamic=False)
    if scaler is None and str(compute_dtype) == "float16":
        logger.warning("compute_dtype is float16 but runner_wrapper.scale_sense configures no loss scaling: small "
                       "gradients will underflow (add scale_sense: {type: DynamicLossScaleUpdateCell, "
                       "loss_scale_value: 65536, scale_factor: 2, scale_window: 1000})")
    return scaler
