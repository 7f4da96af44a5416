"""The pretraining loop: data -> forward/backward -> checks -> update -> expert bias -> log -> checkpoint.

Every rank runs the same loop. Gradients, losses and expert loads are summed over data-parallel
ranks inside the compiled forward/backward, so the decisions taken in Python here (skip a
non-finite step, stop on SIGTERM, update the expert biases) are identical on every rank and the
parameters never diverge.

The trainer keeps the loop and its stop/skip policy; around it, `settings.RunSettings` reads the YAML once,
`data_stream` sizes the run and feeds it, `checkpoint.CheckpointManager` saves and restores, and
`metrics.MetricsLogger` reports. The YAML sections are MindFormers': `runner_config` (batch_size =
micro batch per rank, gradient_accumulation_steps, epochs, plus `train_steps`,
`max_consecutive_nan_steps`, `data_exhausted`, `device_peak_tflops`, `device`), `runner_wrapper`
(use_clip_grad, max_grad_norm, scale_sense: loss scaling for float16, see `loss_scale.py`),
`optimizer`, `lr_schedule`, `train_dataset` (data_loader, num_parallel_workers), `callbacks`
(MFLossMonitor per_print_times, CheckpointMonitor save_checkpoint_steps / keep_checkpoint_max),
`tensorboard.tensorboard_dir` and `output_dir`.
"""
import math
import time
from typing import Any, NamedTuple

import numpy as np

from mindpretrain.training.checkpoint import CheckpointManager
from mindpretrain.training.data_stream import DataExhausted, planned_steps, training_stream
from mindpretrain.training.loss_scale import build_loss_scaler
from mindpretrain.training.lr_schedule import build_lr_schedule
from mindpretrain.training.metrics import MetricsLogger, peak_flops
from mindpretrain.training.optimizer import build_optimizer
from mindpretrain.training.progress import flops_per_token_or_none
from mindpretrain.training.settings import DataParallelInfo
from mindpretrain.training.signals import StopRequest
from mindpretrain.training.train_step import (ForwardBackwardCell, PipelineForwardBackwardCell, UpdateStep,
                                              clip_factor, expert_load_shape)
from mindpretrain.utils.logging import get_logger
from mindpretrain.validation import require

logger = get_logger("train")


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


def model_parameters(model):
    """{checkpoint name: Parameter} of every model parameter (trainable or not, e.g. expert biases)."""
    return {param.name: param for param in model.get_parameters()}


def local_weight_flags(weights, expert_layout):
    """Per trainable weight: True when only this rank holds it (a routed expert of a split layout), else None
    when nothing is split. Those gradients already sum every rank's tokens and skip the data-parallel reduce."""
    if expert_layout is None or not expert_layout.partitioned:
        return None
    from mindpretrain.parallel.expert_groups import expert_index

    return [expert_index(param.name) is not None for param in weights]


class StepOutcome(NamedTuple):
    """One train step as the loop and the metrics see it."""

    losses: Any            # [loss, lm_loss, mtp_loss, balance_loss]
    lr: float
    grad_norm: float
    expert_load: Any
    finite: bool           # False: the update was skipped
    stop_everywhere: bool  # some rank received SIGTERM
    loss_scale: float = None   # the scale this step ran with (loss scaling only)
    overflow: bool = False
    target_tokens: int = None  # loss-mask sum of the global batch (the tokens the loss is taken over)


class Trainer:
    """One model's training run: `Trainer(settings, model, model_config, dp, pipeline).train()`."""

    def __init__(self, settings, model, model_config=None, dp=None, pipeline=None):
        """`settings`: RunSettings; `pipeline`: a plan.PipelineWrapping (Ascend pipeline runs) or None."""
        import mindspore as ms

        self.ms = ms
        self.settings = settings
        self.model, self.model_config = model, model_config
        self.dp = dp or DataParallelInfo()
        settings.check_model(model_config)
        self.params = model_parameters(model)
        self.trainable = model.trainable_params()
        low_precision = sorted({str(param.dtype) for param in self.trainable} - {"Float32"})
        if low_precision:
            logger.warning("trainable parameters are stored as %s: AdamW keeps float32 moments, but the master "
                           "weights themselves are not float32 (set model_config.param_init_type: float32 and "
                           "compute in compute_dtype)", ", ".join(low_precision))
        self.optimizer = build_optimizer(settings.optimizer, self.trainable)
        self.loss_scaler = build_loss_scaler(settings.runner_wrapper, getattr(model_config, "compute_dtype", None))
        self.pipeline = pipeline
        # experts split over the ranks (model_config.expert_layout, set by the launcher) or None
        self.expert_layout = getattr(model_config, "expert_layout", None)
        self.forward_backward = self._forward_backward_cell(pipeline)
        self.apply_update = UpdateStep(self.optimizer)
        self.checkpoints = CheckpointManager(settings, self.dp, self.params, self.optimizer, self.loss_scaler,
                                             model, model_config, self.expert_layout)
        self.step = 0
        self.consumed_samples = 0
        self.nan_in_a_row = 0
        self.skipped_steps = 0
        self.history = []
        self.stop_request = StopRequest()

    def _forward_backward_cell(self, pipeline):
        settings = self.settings
        if settings.per_token_loss:
            set_reduction = getattr(self.model, "set_loss_reduction", None)
            require(set_reduction is not None, "runner_config.calculate_per_token_loss", True,
                    f"needs a model with set_loss_reduction ({type(self.model).__name__} has none)")
            set_reduction("sum")
        if pipeline is None:
            return ForwardBackwardCell(self.model, self.trainable, settings.accumulation_steps, self.dp.size,
                                       loss_scaling=self.loss_scaler is not None,
                                       per_token_loss=settings.per_token_loss,
                                       local_weights=local_weight_flags(self.trainable, self.expert_layout))
        require(settings.accumulation_steps == 1 and self.dp.size == 1, "runner_config",
                {"gradient_accumulation_steps": settings.accumulation_steps, "dp": self.dp.size},
                "pipeline runs accumulate over parallel_config.micro_batch_num and let semi-auto parallel "
                "reduce gradients: use gradient_accumulation_steps 1")
        cell = PipelineForwardBackwardCell(self.model, self.trainable, pipeline.micro_batch_num,
                                           expert_load_shape(self.model), pipeline.optimizer_shard,
                                           per_token_loss=settings.per_token_loss)
        # MindSpore's pipeline example (PipelineGradReducer docstring) calls set_train() on the pipeline cell.
        cell.set_train(True)
        return cell

    @property
    def samples_per_step(self):
        return self.settings.samples_per_step(self.dp.size)

    def _make_stream(self, total_steps):
        return training_stream(self.settings, self.dp, total_steps, self.consumed_samples)

    def resume(self, location=None):
        """Restore everything from the newest good checkpoint under `location` (default: ours);
        returns the checkpoint directory, or None when there is none."""
        point = self.checkpoints.resume(location)
        if point is None:
            return None
        self.step, self.consumed_samples, self.skipped_steps = point.step, point.consumed_samples, point.skipped_steps
        return point.directory

    def _save(self):
        return self.checkpoints.save(self.step, self.consumed_samples, self.skipped_steps)

    # --- the loop ------------------------------------------------------------------------------
    def train(self, resume=False, load_checkpoint=None):
        """Run to `train_steps`; returns a summary dict whose `status` is completed, terminated or
        data_exhausted (TrainingError when too many steps in a row were non-finite)."""
        settings = self.settings
        total_steps = planned_steps(settings, self.dp)
        if resume:
            self.resume(load_checkpoint or None)
        elif load_checkpoint:
            self.checkpoints.load_weights(load_checkpoint)
        schedule = build_lr_schedule(settings.lr_schedule, total_steps)
        stream = self._make_stream(total_steps)
        metrics = MetricsLogger(settings.output_dir, self.dp.process_rank, total_steps,
                                self.samples_per_step * settings.seq_length, self.history, settings.log_interval,
                                self.loss_scaler is not None,
                                flops_per_token_or_none(self.model_config, settings.seq_length),
                                peak_flops(settings.device_peak_tflops, settings.device, self.dp.size),
                                settings.tensorboard_dir)
        started = time.time()
        logger.info("training %d steps from step %d: %d samples of %d tokens per step (batch_size %d x dp %d x "
                    "accumulation %d)", total_steps, self.step, self.samples_per_step, settings.seq_length,
                    settings.micro_batch_size, self.dp.size, settings.accumulation_steps)
        first_step = self.step
        self.stop_request.install()
        try:
            status = self._run_steps(total_steps, schedule, stream, metrics)
            if status != "completed" or (self.step == total_steps and self.step > first_step):
                self._save()
        finally:
            self.stop_request.uninstall()
            metrics.close()
        summary = metrics.summary(status, self.step, first_step, time.time() - started, self.skipped_steps,
                                  self.consumed_samples)
        logger.info("%s", summary["line"])
        return summary

    def _run_steps(self, total_steps, schedule, stream, metrics):
        """Steps until `total_steps`, exhausted data or SIGTERM; returns the run's status."""
        settings = self.settings
        while self.step < total_steps:
            step_start = time.time()
            try:
                batch = stream.next_step()
            except DataExhausted as error:
                logger.error("%s", error)
                return "data_exhausted"
            outcome = self._train_step(batch, schedule)
            self.step += 1
            self.consumed_samples = stream.consumed_samples
            values = metrics.step_metrics(outcome, self.step, self.consumed_samples, time.time() - step_start)
            if settings.param_checksum:
                values["param_checksum"] = self.parameter_checksum()
            metrics.write(values)
            if self.nan_in_a_row >= settings.max_nan_steps:
                raise TrainingError(f"stopping: {self.nan_in_a_row} consecutive steps had a non-finite loss "
                                    f"or gradient (runner_config.max_consecutive_nan_steps = "
                                    f"{settings.max_nan_steps}); the last good state is in the latest "
                                    "checkpoint — lower the learning rate or check the data")
            if outcome.stop_everywhere:
                logger.warning("stop requested (SIGTERM): saving a checkpoint at step %d and exiting", self.step)
                return "terminated"
            if settings.save_steps and self.step % settings.save_steps == 0 and self.step < total_steps:
                self._save()
        return "completed"

    def _train_step(self, batch, schedule):
        """Forward/backward, then the update and the expert-bias rule only if loss and gradients are finite."""
        ms = self.ms
        stop_flag = ms.Tensor(1.0 if self.stop_request.requested else 0.0, ms.float32)
        scaler = self.loss_scaler
        loss_scale = ms.Tensor(scaler.scale if scaler is not None else 1.0, ms.float32)
        tensors = [ms.Tensor(array) for array in batch]     # input_ids, labels, loss_mask, then any layout columns
        losses, expert_load, grad_norm, grads = self.forward_backward(*tensors[:3], stop_flag, loss_scale,
                                                                      *tensors[3:])
        losses = losses.asnumpy()
        stop_everywhere = bool(losses[4] > 0)
        target_tokens = int(round(float(losses[5]))) if math.isfinite(float(losses[5])) else None
        losses = losses[:4]
        grad_norm = float(grad_norm.asnumpy())
        expert_load = expert_load.asnumpy()
        # The schedule advances with applied updates only, as MindFormers' optimizer global_step and
        # Megatron's scheduler do: a skipped step (overflow or NaN) leaves the learning rate where it was.
        lr = schedule(self.step - self.skipped_steps)
        finite = bool(np.all(np.isfinite(losses)) and math.isfinite(grad_norm))
        outcome = StepOutcome(losses, lr, grad_norm, expert_load, finite, stop_everywhere, target_tokens=target_tokens)
        if scaler is not None:
            outcome = self._update_loss_scale(outcome)
            if outcome.overflow:
                return outcome
        if finite:
            self.apply_update(grads, ms.Tensor(lr, ms.float32),
                              ms.Tensor(clip_factor(grad_norm, self.settings.max_grad_norm), ms.float32))
            self._reduce_expert_load(expert_load)
            self.nan_in_a_row = 0
        else:
            self.nan_in_a_row += 1
            self.skipped_steps += 1
            logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped "
                           "(%d in a row, limit %d)", self.step + 1, losses[0], grad_norm,
                           self.nan_in_a_row, self.settings.max_nan_steps)
        return outcome

    def _update_loss_scale(self, outcome):
        """Advance the loss scale. A finite loss with non-finite gradients is a float16 overflow of the scaled
        backward: the step is skipped without counting towards the NaN limit while shrinking can help."""
        scaler = self.loss_scaler
        overflow = not outcome.finite and bool(np.all(np.isfinite(outcome.losses))) and not scaler.at_minimum
        scale_used = scaler.scale
        scaler.update(not outcome.finite)
        if overflow:
            self.skipped_steps += 1
            logger.warning("step %d: gradient overflow at loss scale %g; update skipped, loss scale now %g",
                           self.step + 1, scale_used, scaler.scale)
        return outcome._replace(loss_scale=scale_used, overflow=overflow)

    def _reduce_expert_load(self, expert_load):
        """Rank-summed load -> the model's bias rule (identical on every rank)."""
        update = getattr(self.model, "update_expert_bias", None)
        if update is not None and expert_load.size:
            update(expert_load)

    def parameter_checksum(self):
        """CRC-32 of the parameters and optimizer state (debug: ranks must agree); see `parameter_checksum`."""
        return parameter_checksum(self.params, self.optimizer, self.expert_layout)


def parameter_checksum(params, optimizer, expert_layout=None):
    """CRC-32 of every parameter's bytes and the optimizer state, over the whole model: with experts split over
    the ranks every rank's slice is gathered first (a collective: every rank calls it)."""
    import zlib

    from mindpretrain.parallel.expert_groups import gather_full_tensors

    crc = 0
    for tensors in (params, optimizer.state_parameters()):
        for _, array in sorted(gather_full_tensors(tensors, expert_layout).items()):
            crc = zlib.crc32(array.tobytes(), crc)
    return crc
