"""The trainer's settings, read from the run YAML and validated once, before anything is built.

`RunSettings.from_config(run_config)` is the only place that reads the YAML sections the loop uses
(MindFormers' `runner_config`, `runner_wrapper`, `callbacks`, `train_dataset`, `tensorboard`), so a bad
value fails at start-up with the key, the value and the rule, not mid-run. Every run-level key is first
checked against MindFormers' vocabulary (`mindpretrain.mindformers_keys`): a typo fails with "did you
mean", and the accepted keys that change nothing here are kept in `no_effect_keys` for the start-up notice.
Where MindFormers has a default, it is MindFormers' (`use_clip_grad: False`, `max_grad_norm: 1.0`).
"""
import dataclasses
import numbers
import os
from typing import Any

from mindpretrain import mindformers_keys
from mindpretrain.checkpoint.conversion import MTP_CHOICES
from mindpretrain.utils.logging import get_logger
from mindpretrain.validation import require

logger = get_logger("run")
# MindFormers' TrainOneStep wrappers; MFPipelineWithLossScaleCell is what it picks itself under pipeline stages.
RUNNER_WRAPPERS = ("MFTrainOneStepCell", "MFPipelineWithLossScaleCell", "TrainOneStepCell")

DEFAULT_LR_SCHEDULE = {"type": "ConstantWarmUpLR", "learning_rate": 1e-4}


@dataclasses.dataclass
class DataParallelInfo:
    """This process's data-parallel rank and group size (plus its global rank, for file names)."""

    rank: int = 0
    size: int = 1
    global_rank: int = None

    @property
    def process_rank(self):
        return self.rank if self.global_rank is None else self.global_rank


@dataclasses.dataclass
class RunSettings:
    """Everything the trainer reads from the run YAML, read and validated once (`from_config`), not mid-run.

    The YAML sections handed on to their builders (optimizer, lr_schedule, runner_wrapper, data loader) are
    kept as written; `run_config` is the whole resolved YAML, saved with every checkpoint."""

    micro_batch_size: int = 1
    accumulation_steps: int = 1
    train_steps: int = None
    epochs: int = 1
    log_interval: int = 1
    save_steps: int = None
    keep_last: int = 3
    max_nan_steps: int = 5
    on_data_exhausted: str = "stop"
    max_grad_norm: float = 1.0
    device_peak_tflops: float = None
    device: str = None                 # runner_config.device: the cost model's peak FLOPs when no tflops given
    tensorboard_dir: str = None
    seq_length: int = None
    param_checksum: bool = False
    output_dir: str = "./output"
    optimizer: Any = None              # YAML `optimizer` section (None: AdamW defaults)
    lr_schedule: Any = dataclasses.field(default_factory=lambda: dict(DEFAULT_LR_SCHEDULE))
    runner_wrapper: Any = None         # YAML `runner_wrapper` (loss scaling)
    data_loader: Any = None            # YAML `train_dataset.data_loader`
    num_parallel_workers: int = 1
    load_checkpoint_mtp: str = "init"  # --mtp: weights without MTP layers (require | init | drop)
    per_token_loss: bool = False       # runner_config.calculate_per_token_loss: sum(CE)/targets of the global batch
    no_effect_keys: tuple = ()         # accepted MindFormers keys that change nothing here (dotted names)
    run_config: Any = None

    @classmethod
    def from_config(cls, run_config, output_dir=None):
        """The settings of a whole run YAML (`output_dir` overrides the YAML's)."""
        no_effect_keys = mindformers_keys.check_run_config(run_config)
        runner = dict(run_config.get("runner_config") or {})
        wrapper = dict(run_config.get("runner_wrapper") or {})
        settings = cls(
            micro_batch_size=runner.get("batch_size", 1),
            accumulation_steps=runner.get("gradient_accumulation_steps", 1) or 1,
            train_steps=runner.get("train_steps"),
            epochs=runner.get("epochs", 1) or 1,
            max_nan_steps=runner.get("max_consecutive_nan_steps", 5),
            on_data_exhausted=runner.get("data_exhausted", "stop"),
            device_peak_tflops=runner.get("device_peak_tflops"),
            device=runner.get("device"),
            max_grad_norm=gradient_clip_norm(wrapper),
            param_checksum=bool(runner.get("log_param_checksum", False)),
            per_token_loss=runner.get("calculate_per_token_loss", False),
            output_dir=output_dir or run_config.get("output_dir") or "./output",
            optimizer=_honoured(run_config.get("optimizer"), "optimizer"),
            lr_schedule=run_config.get("lr_schedule") or dict(DEFAULT_LR_SCHEDULE),
            runner_wrapper=run_config.get("runner_wrapper"),
            data_loader=run_config.get_path("train_dataset.data_loader"),
            num_parallel_workers=clamp_workers(run_config.get_path("train_dataset.num_parallel_workers", 1)),
            load_checkpoint_mtp=run_config.get("load_checkpoint_mtp", "init"),
            no_effect_keys=no_effect_keys,
            run_config=run_config,
        )
        settings._read_callbacks(run_config.get("callbacks") or [])
        settings.tensorboard_dir = (run_config.get("tensorboard") or {}).get("tensorboard_dir")
        settings.seq_length = ((run_config.get_path("train_dataset.data_loader.config") or {}).get("seq_length")
                               or run_config.get_path("train_dataset.data_loader.seq_length")   # MindDataset's
                               or run_config.get_path("model.model_config.seq_length"))
        settings.data_loader = _with_model_defaults(settings.data_loader, settings.seq_length,
                                                    run_config.get_path("model.model_config.pad_token_id"))
        settings.validate()
        return settings

    def _read_callbacks(self, callbacks):
        for callback in callbacks:
            kind = callback.get("type")
            if kind == "MFLossMonitor":
                self.log_interval = callback.get("per_print_times", 1) or 1
            elif kind == "CheckpointMonitor":
                self.save_steps = callback.get("save_checkpoint_steps")
                self.keep_last = callback.get("keep_checkpoint_max", self.keep_last)
                checkpoint_format = callback.get("checkpoint_format", "safetensors")
                require(checkpoint_format == "safetensors", "CheckpointMonitor.checkpoint_format",
                        checkpoint_format, "must be safetensors (mindpretrain writes no pickle-based .ckpt files)")

    def validate(self):
        positive = {"runner_config.batch_size": self.micro_batch_size,
                    "runner_config.gradient_accumulation_steps": self.accumulation_steps,
                    "runner_config.epochs": self.epochs,
                    "MFLossMonitor.per_print_times": self.log_interval,
                    "runner_config.max_consecutive_nan_steps": self.max_nan_steps}
        for key, value in positive.items():
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, value,
                    "must be a positive integer")
        for key, value in {"runner_config.train_steps": self.train_steps,
                           "CheckpointMonitor.save_checkpoint_steps": self.save_steps,
                           "CheckpointMonitor.keep_checkpoint_max": self.keep_last}.items():
            require(value is None or (isinstance(value, int) and value >= 1), key, value,
                    "must be a positive integer or null")
        require(self.on_data_exhausted in ("stop", "next_epoch"), "runner_config.data_exhausted",
                self.on_data_exhausted, "must be 'stop' or 'next_epoch'")
        require(self.seq_length is not None, "train_dataset.data_loader.config.seq_length", self.seq_length,
                "must be set (or model.model_config.seq_length)")
        require(self.load_checkpoint_mtp in MTP_CHOICES, "load_checkpoint_mtp", self.load_checkpoint_mtp,
                f"must be one of {', '.join(MTP_CHOICES)} (--mtp: what to do with weights without MTP layers)")
        require(isinstance(self.per_token_loss, bool), "runner_config.calculate_per_token_loss", self.per_token_loss,
                "must be True or False")
        kind = (self.runner_wrapper or {}).get("type")
        require(kind is None or kind in RUNNER_WRAPPERS, "runner_wrapper.type", kind,
                f"must be one of {', '.join(RUNNER_WRAPPERS)} (the step is compiled by mindpretrain's own train step)")

    def check_model(self, model_config):
        """Refuse samples longer than the model's position tables."""
        model_seq_length = getattr(model_config, "seq_length", None)
        require(not model_seq_length or self.seq_length <= model_seq_length,
                "train_dataset.data_loader.config.seq_length", self.seq_length,
                f"must not exceed model.model_config.seq_length ({model_seq_length}), the model's position tables")

    def samples_per_step(self, dp_size):
        """Global samples one optimizer step consumes: batch_size x dp x accumulation."""
        return self.micro_batch_size * dp_size * self.accumulation_steps


def _with_model_defaults(data_loader, seq_length, pad_token_id):
    """MindFormers keeps the MindRecord sample length and pad id in model_config: MindDataset gets them from there
    unless its own section sets them."""
    if not isinstance(data_loader, dict) or data_loader.get("type") != "MindDataset":
        return data_loader
    defaults = {"seq_length": seq_length, "pad_token_id": pad_token_id}
    return {**{key: value for key, value in defaults.items() if value is not None}, **data_loader}


def _honoured(section, path):
    return None if section is None else mindformers_keys.honoured_only(section, path)


def gradient_clip_norm(runner_wrapper):
    """The global-norm clip of `runner_wrapper` (MindFormers' MFTrainOneStepCell: `use_clip_grad` defaults to
    False, `max_grad_norm` to 1.0), or None for no clipping."""
    use_clip_grad = runner_wrapper.get("use_clip_grad", False)
    require(isinstance(use_clip_grad, bool), "runner_wrapper.use_clip_grad", use_clip_grad, "must be True or False")
    if not use_clip_grad:
        return None
    norm = runner_wrapper.get("max_grad_norm", 1.0)
    require(isinstance(norm, numbers.Real) and not isinstance(norm, bool) and norm > 0,
            "runner_wrapper.max_grad_norm", norm, "must be a positive number")
    return float(norm)


def clamp_workers(requested):
    """`train_dataset.num_parallel_workers`, at most this host's CPU count (MindSpore's dataset validator refuses
    more; MindFormers' YAMLs ask for 8 whatever the host), with a notice when it is lowered."""
    requested = 1 if requested is None else requested
    require(isinstance(requested, int) and not isinstance(requested, bool) and requested >= 1,
            "train_dataset.num_parallel_workers", requested, "must be a positive integer")
    cores = os.cpu_count() or 1
    if requested > cores:
        logger.info("train_dataset.num_parallel_workers (%d) lowered to %d, the CPU count of this host",
                    requested, cores)
        return cores
    return requested
