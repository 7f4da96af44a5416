"""The pretraining loop: data -> forward/backward -> checks -> update -> expert bias -> log -> checkpoint.

Every rank runs the same loop. Gradients, losses and expert loads are summed over data-parallel
ranks inside the compiled forward/backward, so the decisions taken in Python here (skip a
non-finite step, stop on SIGTERM, update the expert biases) are identical on every rank and the
parameters never diverge.

The YAML sections read here are MindFormers': `runner_config` (batch_size = micro batch per
rank, gradient_accumulation_steps, epochs, plus `train_steps`, `max_consecutive_nan_steps`,
`data_exhausted`, `device_peak_tflops`), `runner_wrapper` (use_clip_grad, max_grad_norm,
scale_sense: loss scaling for float16, see `loss_scale.py`),
`optimizer`, `lr_schedule`, `train_dataset.data_loader`, `callbacks` (MFLossMonitor
per_print_times, CheckpointMonitor save_checkpoint_steps / keep_checkpoint_max) and
`tensorboard.tensorboard_dir`.
"""
import dataclasses
import math
import os
import time

import numpy as np

from mindpretrain.config import require
from mindpretrain.training import checkpoint as ckpt
from mindpretrain.training.data_stream import DataExhausted, DataStream
from mindpretrain.training.loss_scale import build_loss_scaler
from mindpretrain.training.lr_schedule import build_lr_schedule
from mindpretrain.training.optimizer import build_optimizer
from mindpretrain.training.progress import (StepTimer, expert_imbalance, flops_per_token_or_none,
                                            format_duration, format_step_line)
from mindpretrain.training.signals import StopRequest
from mindpretrain.training.train_step import (ApplyUpdateCell, ForwardBackwardCell, PipelineForwardBackwardCell,
                                              clip_factor, expert_load_shape)
from mindpretrain.utils.logging import get_logger

logger = get_logger("train")


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


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
    """The loop's knobs, read once from the YAML (validated here, not mid-run)."""

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
    tensorboard_dir: str = None
    seq_length: int = None
    param_checksum: bool = False

    @classmethod
    def from_config(cls, config):
        runner = dict(config.get("runner_config") or {})
        wrapper = dict(config.get("runner_wrapper") or {})
        settings = cls(
            micro_batch_size=runner.get("batch_size", 1),
            accumulation_steps=runner.get("gradient_accumulation_steps", 1) or 1,
            train_steps=runner.get("train_steps"),
            epochs=runner.get("epochs", 1) or 1,
            max_nan_steps=runner.get("max_consecutive_nan_steps", 5),
            on_data_exhausted=runner.get("data_exhausted", "stop"),
            device_peak_tflops=runner.get("device_peak_tflops"),
            max_grad_norm=(wrapper.get("max_grad_norm", 1.0) if wrapper.get("use_clip_grad", True) else None),
            param_checksum=bool(runner.get("log_param_checksum", False)),
        )
        for callback in config.get("callbacks") or []:
            kind = callback.get("type")
            if kind == "MFLossMonitor":
                settings.log_interval = callback.get("per_print_times", 1) or 1
            elif kind == "CheckpointMonitor":
                settings.save_steps = callback.get("save_checkpoint_steps")
                settings.keep_last = callback.get("keep_checkpoint_max", settings.keep_last)
                checkpoint_format = callback.get("checkpoint_format", "safetensors")
                require(checkpoint_format == "safetensors", "CheckpointMonitor.checkpoint_format",
                        checkpoint_format, "must be safetensors (mindpretrain writes no pickle-based .ckpt files)")
        settings.tensorboard_dir = (config.get("tensorboard") or {}).get("tensorboard_dir")
        loader_config = (config.get_path("train_dataset.data_loader.config") or {})
        settings.seq_length = loader_config.get("seq_length")
        settings.validate()
        return settings

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
                "must be set")


def model_parameters(model):
    """{checkpoint name: Parameter} of every model parameter (trainable or not, e.g. expert biases)."""
    return {param.name: param for param in model.get_parameters()}


class Trainer:
    def __init__(self, config, model, model_config=None, dp=None, output_dir=None, pipeline=None):
        """`pipeline`: a launch.PipelineWrapping (Ascend pipeline runs, from launch.pipeline_wrapping) or None."""
        import mindspore as ms

        self.ms = ms
        self.config = config
        self.model = model
        self.model_config = model_config
        self.dp = dp or DataParallelInfo()
        self.output_dir = output_dir or config.get("output_dir") or "./output"
        self.settings = RunSettings.from_config(config)
        model_seq_length = getattr(model_config, "seq_length", None)
        require(not model_seq_length or self.settings.seq_length <= model_seq_length,
                "train_dataset.data_loader.config.seq_length", self.settings.seq_length,
                f"must not exceed model.model_config.seq_length ({model_seq_length}), the model's position tables")
        self.params = model_parameters(model)
        self.trainable = model.trainable_params()
        low_precision = sorted({str(param.dtype) for param in self.trainable} - {"Float32"})
        if low_precision:
            logger.warning("trainable parameters are stored as %s: AdamW keeps float32 moments, but the master "
                           "weights themselves are not float32 (set model_config.param_init_type: float32 and "
                           "compute in compute_dtype)", ", ".join(low_precision))
        self.optimizer = build_optimizer(config.get("optimizer"), self.trainable)
        self.loss_scaler = build_loss_scaler(config.get("runner_wrapper"),
                                             getattr(model_config, "compute_dtype", None))
        self.pipeline = pipeline
        if pipeline is not None:
            require(self.settings.accumulation_steps == 1 and self.dp.size == 1, "runner_config",
                    {"gradient_accumulation_steps": self.settings.accumulation_steps, "dp": self.dp.size},
                    "pipeline runs accumulate over parallel_config.micro_batch_num and let semi-auto parallel "
                    "reduce gradients: use gradient_accumulation_steps 1")
            self.forward_backward = PipelineForwardBackwardCell(model, self.trainable, pipeline.micro_batch_num,
                                                                expert_load_shape(model), pipeline.optimizer_shard)
            # MindSpore's pipeline example (PipelineGradReducer docstring) calls set_train() on the pipeline cell.
            self.forward_backward.set_train(True)
        else:
            self.forward_backward = ForwardBackwardCell(model, self.trainable, self.settings.accumulation_steps,
                                                        self.dp.size, loss_scaling=self.loss_scaler is not None)
        self.apply_update = ApplyUpdateCell(self.optimizer)
        self.step = 0
        self.consumed_samples = 0
        self.nan_in_a_row = 0
        self.skipped_steps = 0
        self.last_loss_scale = None   # the scale the latest step ran with (logged)
        self.last_overflow = False
        self.history = []
        self.stop_request = StopRequest()

    # --- sizes --------------------------------------------------------------------------------
    @property
    def samples_per_step(self):
        settings = self.settings
        return settings.micro_batch_size * self.dp.size * settings.accumulation_steps

    def _loader_section(self, total_steps):
        section = dict(self.config.get_path("train_dataset.data_loader") or {})
        require(section, "train_dataset.data_loader", None, "must be configured for training")
        sizes = list(section.get("sizes") or [None, 0, 0])
        if sizes[0] is None and total_steps is not None:
            sizes[0] = total_steps * self.samples_per_step  # Megatron: train_samples = iters * global batch
        section["sizes"] = sizes
        return section

    def _make_stream(self, total_steps):
        num_workers = self.config.get_path("train_dataset.num_parallel_workers", 1) or 1
        return DataStream(self._loader_section(total_steps), self.dp.rank, self.dp.size,
                          self.settings.micro_batch_size, self.settings.accumulation_steps,
                          self.consumed_samples, self.settings.on_data_exhausted, num_workers)

    def _total_steps(self):
        if self.settings.train_steps is not None:
            return self.settings.train_steps
        probe = DataStream(self._loader_section(None), self.dp.rank, self.dp.size, self.settings.micro_batch_size,
                           self.settings.accumulation_steps)
        steps = self.settings.epochs * probe.epoch_length() // self.samples_per_step
        require(steps > 0, "train_dataset", steps, "yields no full training step of "
                f"{self.samples_per_step} samples; use a larger dataset or a smaller batch")
        return steps

    # --- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_root(self):
        return ckpt.checkpoint_root(self.output_dir)

    def expected_shapes(self):
        return {name: tuple(param.shape) for name, param in self.params.items()}

    def save(self):
        if self.dp.process_rank != 0:
            return None
        state = {"consumed_samples": self.consumed_samples, "skipped_steps": self.skipped_steps,
                 "dp_size": self.dp.size, "samples_per_step": self.samples_per_step,
                 "rng": ckpt.capture_rng_state(),
                 "loss_scale": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
                 "parameter_shapes": {name: list(shape) for name, shape in self.expected_shapes().items()}}
        directory = ckpt.save_checkpoint(self.checkpoint_root, self.step, self.params,
                                         self.optimizer.state_parameters(), state, self.config.to_dict(),
                                         keep_last=self.settings.keep_last)
        logger.info("saved checkpoint %s", directory)
        return directory

    def _assign(self, parameter, array, source):
        Tensor = self.ms.Tensor
        require(tuple(array.shape) == tuple(parameter.shape), parameter.name, list(array.shape),
                f"in {source} does not match the model's shape {list(parameter.shape)}")
        parameter.set_data(Tensor(np.ascontiguousarray(array)).astype(parameter.dtype))

    def resume(self, location=None):
        """Restore everything from the newest good checkpoint under `location` (default: ours)."""
        root = location or self.checkpoint_root
        if os.path.isfile(os.path.join(root, ckpt.COMPLETE_MARKER)):
            ckpt.verify_checkpoint(root)
            directory = root
        else:
            directory = ckpt.find_resumable(root)
        if directory is None:
            logger.warning("resume_training: no checkpoint under %s, starting from step 0", root)
            return None
        ckpt.check_shapes(directory, self.expected_shapes())
        optimizer_state = self.optimizer.state_parameters()
        ckpt.check_shapes(directory, {name: tuple(p.shape) for name, p in optimizer_state.items()},
                          ckpt.OPTIMIZER_FILE, ckpt.OPTIMIZER_PREFIX)
        for name, array in ckpt.read_tensors(directory, ckpt.MODEL_FILE).items():
            self._assign(self.params[name], array, directory)
        for name, array in ckpt.read_tensors(directory, ckpt.OPTIMIZER_FILE, ckpt.OPTIMIZER_PREFIX).items():
            self._assign(optimizer_state[name], array, directory)
        state = ckpt.read_trainer_state(directory)
        require(state["consumed_samples"] % (self.settings.micro_batch_size * self.dp.size) == 0,
                "resume", state["consumed_samples"],
                f"consumed samples are not a multiple of batch_size * dp ({self.settings.micro_batch_size} x "
                f"{self.dp.size}); resume with the batch layout of the checkpoint")
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        ckpt.restore_rng_state(state.get("rng"))
        self._restore_loss_scale(state.get("loss_scale"), directory)
        logger.info("resumed from %s: step %d, %d samples consumed", directory, self.step, self.consumed_samples)
        return directory

    def _restore_loss_scale(self, saved, directory):
        if self.loss_scaler is None:
            if saved:
                logger.warning("checkpoint %s was trained with loss scaling (scale %s); this run configures none "
                               "(runner_wrapper.scale_sense)", directory, saved.get("scale"))
            return
        if not saved:
            logger.warning("checkpoint %s has no loss-scale state; starting from scale_sense's loss_scale_value %s",
                           directory, self.loss_scaler.scale)
            return
        self.loss_scaler.load_state_dict(saved)

    def load_weights(self, path):
        """Model weights only (finetune / warm start): a native checkpoint or a Hugging Face directory."""
        if ckpt.is_native_checkpoint(path):
            ckpt.verify_checkpoint(path)
            ckpt.check_shapes(path, self.expected_shapes())
            for name, array in ckpt.read_tensors(path, ckpt.MODEL_FILE).items():
                self._assign(self.params[name], array, path)
        else:
            from research.deepseek3.hf_weights import CheckpointMismatchError, load_hf_weights

            try:
                load_hf_weights(self.model, path)
            except CheckpointMismatchError as error:
                raise ckpt.CheckpointError(f"--load_checkpoint {path}: {error}") from None
        logger.info("loaded weights from %s", path)

    # --- the loop ------------------------------------------------------------------------------
    def _reduce_expert_load(self, expert_load):
        """Rank-summed load -> the model's bias rule (identical on every rank)."""
        update = getattr(self.model, "update_expert_bias", None)
        if update is not None and expert_load.size:
            update(expert_load)

    def _peak_flops(self):
        """Peak FLOP/s of all data-parallel devices: runner_config.device_peak_tflops, or the planning
        cost model's table entry for runner_config.device (e.g. atlas-800t-a2)."""
        if self.settings.device_peak_tflops:
            return float(self.settings.device_peak_tflops) * 1e12 * self.dp.size
        device = (self.config.get("runner_config") or {}).get("device")
        if device:
            try:
                from mindpretrain.planning.cost_model import device_peak_flops
            except ImportError:
                return None
            peak = device_peak_flops(device)
            return peak * self.dp.size if peak else None
        return None

    def train(self, resume=False, load_checkpoint=None):
        """Run to `train_steps`; returns a summary dict whose `status` is completed, terminated or
        data_exhausted (TrainingError when too many steps in a row were non-finite)."""
        settings = self.settings
        total_steps = self._total_steps()
        if resume:
            self.resume(load_checkpoint or None)
        elif load_checkpoint:
            self.load_weights(load_checkpoint)
        schedule = build_lr_schedule(self.config.get("lr_schedule") or {"type": "ConstantWarmUpLR",
                                                                        "learning_rate": 1e-4},
                                     total_steps)
        stream = self._make_stream(total_steps)
        writer = None
        if settings.tensorboard_dir and self.dp.process_rank == 0:
            from mindpretrain.training.tensorboard import ScalarWriter

            writer = ScalarWriter(settings.tensorboard_dir)
        flops_per_token = flops_per_token_or_none(self.model_config, settings.seq_length)
        peak = self._peak_flops()
        tokens_per_step = self.samples_per_step * settings.seq_length
        timer = StepTimer(warmup_steps=1)
        started = time.time()
        status = "completed"
        logger.info("training %d steps from step %d: %d samples of %d tokens per step (batch_size %d x dp %d x "
                    "accumulation %d)", total_steps, self.step, self.samples_per_step, settings.seq_length,
                    settings.micro_batch_size, self.dp.size, settings.accumulation_steps)
        first_step = self.step
        self.stop_request.install()
        try:
            while self.step < total_steps:
                step_start = time.time()
                try:
                    input_ids, labels, loss_mask = stream.next_step()
                except DataExhausted as error:
                    logger.error("%s", error)
                    status = "data_exhausted"
                    break
                losses, lr, grad_norm, expert_load, finite, stop_everywhere = self._train_step(
                    (input_ids, labels, loss_mask), schedule)
                self.step += 1
                self.consumed_samples = stream.consumed_samples
                step_time = time.time() - step_start
                timer.add(step_time)
                metrics = self._metrics(losses, lr, grad_norm, expert_load, step_time, tokens_per_step,
                                        flops_per_token, peak, timer.eta(total_steps - self.step),
                                        total_steps, not finite)
                if settings.param_checksum:
                    metrics["param_checksum"] = self.parameter_checksum()
                self.history.append(metrics)
                self._append_metrics(metrics)
                if self.step % settings.log_interval == 0 or self.step == total_steps or not finite:
                    logger.info("%s", format_step_line(metrics))
                if writer is not None:
                    writer.add_scalars({key: metrics[key] for key in ("loss", "lm_loss", "mtp_loss", "lr",
                                                                       "grad_norm", "tokens_per_second", "loss_scale")
                                        if metrics.get(key) is not None}, self.step)
                if self.nan_in_a_row >= settings.max_nan_steps:
                    raise TrainingError(f"stopping: {self.nan_in_a_row} consecutive steps had a non-finite loss "
                                        f"or gradient (runner_config.max_consecutive_nan_steps = "
                                        f"{settings.max_nan_steps}); the last good state is in the latest "
                                        "checkpoint — lower the learning rate or check the data")
                if stop_everywhere:
                    logger.warning("stop requested (SIGTERM): saving a checkpoint at step %d and exiting", self.step)
                    status = "terminated"
                    break
                if settings.save_steps and self.step % settings.save_steps == 0 and self.step < total_steps:
                    self.save()
            if status != "completed" or self.step == total_steps:
                if self.step > first_step or status != "completed":
                    self.save()
        finally:
            self.stop_request.uninstall()
            if writer is not None:
                writer.close()
        summary = self._summary(status, total_steps, time.time() - started, timer, first_step)
        logger.info("%s", summary["line"])
        return summary

    def _train_step(self, batch, schedule):
        """Forward/backward, then the update and the expert-bias rule only if loss and gradients are finite.

        Returns (losses [loss, lm, mtp, balance], lr, grad_norm, expert_load, finite, stop_everywhere).
        """
        ms = self.ms
        stop_flag = ms.Tensor(1.0 if self.stop_request.requested else 0.0, ms.float32)
        scaler = self.loss_scaler
        loss_scale = ms.Tensor(scaler.scale if scaler is not None else 1.0, ms.float32)
        losses, expert_load, grad_norm, grads = self.forward_backward(*(ms.Tensor(array) for array in batch),
                                                                      stop_flag, loss_scale)
        losses = losses.asnumpy()
        stop_everywhere = bool(losses[4] > 0)
        losses = losses[:4]
        grad_norm = float(grad_norm.asnumpy())
        expert_load = expert_load.asnumpy()
        # The schedule advances with applied updates only, as MindFormers' optimizer global_step and
        # Megatron's scheduler do: a skipped step (overflow or NaN) leaves the learning rate where it was.
        lr = schedule(self.step - self.skipped_steps)
        finite = bool(np.all(np.isfinite(losses)) and math.isfinite(grad_norm))
        if scaler is not None:
            # A finite loss with non-finite gradients is a float16 overflow of the scaled backward:
            # shrink the scale and skip, without counting towards the NaN limit while shrinking can help.
            overflow = not finite and bool(np.all(np.isfinite(losses))) and not scaler.at_minimum
            scale_used = self.last_loss_scale = scaler.scale
            scaler.update(not finite)
            self.last_overflow = overflow
            if overflow:
                self.skipped_steps += 1
                logger.warning("step %d: gradient overflow at loss scale %g; update skipped, loss scale now %g",
                               self.step + 1, scale_used, scaler.scale)
                return losses, lr, grad_norm, expert_load, False, stop_everywhere
        if finite:
            self.apply_update(ms.mutable(grads), ms.Tensor(lr, ms.float32),
                              ms.Tensor(clip_factor(grad_norm, self.settings.max_grad_norm), ms.float32))
            self._reduce_expert_load(expert_load)
            self.nan_in_a_row = 0
        else:
            self.nan_in_a_row += 1
            self.skipped_steps += 1
            logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped "
                           "(%d in a row, limit %d)", self.step + 1, losses[0], grad_norm,
                           self.nan_in_a_row, self.settings.max_nan_steps)
        return losses, lr, grad_norm, expert_load, finite, stop_everywhere

    def parameter_checksum(self):
        """CRC-32 of every parameter's bytes and the optimizer state (debug: ranks must agree)."""
        import zlib

        crc = 0
        for _, param in sorted(self.params.items()) + sorted(self.optimizer.state_parameters().items()):
            crc = zlib.crc32(param.asnumpy().tobytes(), crc)
        return crc

    def _append_metrics(self, metrics):
        """One JSON line per step in <output_dir>/metrics/rank_<r>.jsonl (exact floats, for tools and tests)."""
        import json

        directory = os.path.join(self.output_dir, "metrics")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"rank_{self.dp.process_rank}.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def _metrics(self, losses, lr, grad_norm, expert_load, step_time, tokens_per_step, flops_per_token,
                 peak, eta, total_steps, skipped):
        tokens_per_second = tokens_per_step / step_time if step_time > 0 else float("nan")
        mfu = None
        if flops_per_token and peak:
            mfu = tokens_per_second * flops_per_token / peak
        imbalance_max, imbalance_mean = expert_imbalance(expert_load)
        scale = ({"loss_scale": self.last_loss_scale, "overflow": self.last_overflow}
                 if self.loss_scaler is not None else {})
        return {**scale, "step": self.step, "total_steps": total_steps, "loss": float(losses[0]),
                "lm_loss": float(losses[1]), "mtp_loss": float(losses[2]), "balance_loss": float(losses[3]),
                "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tokens_per_second,
                "step_time": step_time, "mfu": mfu, "load_imbalance_max": imbalance_max,
                "load_imbalance_mean": imbalance_mean, "eta": eta, "skipped": skipped,
                "consumed_samples": self.consumed_samples}

    def _summary(self, status, total_steps, elapsed, timer, first_step):
        ran = [m for m in self.history if m["step"] > first_step]
        mean_step = timer.steady_mean()
        tokens_per_second = (self.samples_per_step * self.settings.seq_length / mean_step) if mean_step else None
        summary = {"status": status, "steps": self.step, "total_steps": total_steps, "elapsed": elapsed,
                   "first_loss": ran[0]["loss"] if ran else None, "last_loss": ran[-1]["loss"] if ran else None,
                   "mean_step_time": mean_step, "tokens_per_second": tokens_per_second,
                   "skipped_steps": self.skipped_steps, "consumed_samples": self.consumed_samples}
        first = f"{summary['first_loss']:.4f}" if ran else "n/a"
        last = f"{summary['last_loss']:.4f}" if ran else "n/a"
        speed = f"{tokens_per_second:.0f} tokens/s, {mean_step:.3f} s/step" if mean_step else "n/a"
        summary["line"] = (f"training {status}: step {self.step}/{total_steps}, loss {first} -> {last}, "
                           f"{speed} (steady state), {self.skipped_steps} skipped steps, "
                           f"{self.consumed_samples} samples, wall time {format_duration(elapsed)}")
        return summary
