"""Training: AdamW, LR schedules, the compiled train step, the loop, checkpoints, metrics, signals.

Importing this package registers the optimizer and LR schedules under their MindFormers names.
"""
from mindpretrain.training import lr_schedule, optimizer  # noqa: F401  (registration)
