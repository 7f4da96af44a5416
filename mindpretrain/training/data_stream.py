"""This rank's training batches, step by step, resumable from the global `consumed_samples`.

A step consumes `A` global batches of `micro_batch_size * dp_size` samples (A = gradient
accumulation steps); the data loader (`train_dataset.data_loader`, built through the registry,
normally `BlendedMegatronDatasetDataLoader`) hands this rank its `micro_batch_size` share of each,
in Megatron's order. So the data position is one integer, and a resumed run sees exactly the
batches an uninterrupted run would have seen.

When the dataset runs out, `runner_config.data_exhausted` decides: `stop` (default) raises
DataExhausted with a message saying how to get more samples; `next_epoch` starts the dataset
over (same order; the position within the epoch is `consumed_samples % epoch_samples`).

`planned_steps` and `training_stream` size a run for the trainer: its length (train_steps, or whole
epochs of the dataset) and the loader's sample count (`sizes[0]`, Megatron's train_samples).
"""
import numpy as np

from mindpretrain import registry
from mindpretrain.data.sft_dataset import SFT_COLUMNS
from mindpretrain.validation import require

MODEL_COLUMNS = ("input_ids", "labels", "loss_mask")
# Packed fine-tuning rows (SFT_COLUMNS) add the document layout the model needs (docs/sft.md).
COLUMN_DTYPES = {"input_ids": np.int32, "labels": np.int32, "loss_mask": np.float32, "position_ids": np.int32,
                 "actual_seq_len": np.int32}


def model_columns(loader_section):
    """The columns the model takes from this loader: SFT data (`datasets_type: SFTDataset`, MindFormers'
    MindRecord finetune data) carries the document layout, pretraining data does not."""
    section = loader_section or {}
    if section.get("type") == "MindDataset" or section.get("datasets_type") == "SFTDataset":
        return SFT_COLUMNS
    return MODEL_COLUMNS


class DataExhausted(RuntimeError):
    """The training dataset holds no further full step of samples."""


class DataStream:
    """`next_step()` -> this rank's arrays of the next step; `consumed_samples` is the global position."""

    def __init__(self, loader_section, dp_rank, dp_size, micro_batch_size, accumulation_steps,
                 consumed_samples=0, on_exhausted="stop", num_parallel_workers=1):
        require(on_exhausted in ("stop", "next_epoch"), "runner_config.data_exhausted", on_exhausted,
                "must be 'stop' or 'next_epoch'")
        self.section = dict(loader_section)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch_size, self.accumulation_steps = micro_batch_size, accumulation_steps
        self.samples_per_step = micro_batch_size * dp_size * accumulation_steps
        self.on_exhausted = on_exhausted
        self.num_parallel_workers = num_parallel_workers
        self.consumed_samples = consumed_samples
        self.epoch_samples = None
        self._iterator = None
        self._opened_at = None

    def _build(self, consumed_in_epoch):
        section = {key: value for key, value in self.section.items()
                   if key not in ("type", "num_parallel_workers")}  # workers come from train_dataset
        section["column_names"] = model_columns(self.section)  # the model takes exactly these, in this order
        dataset = registry.get("data_loader", self.section.get("type", "BlendedMegatronDatasetDataLoader"))(
            dp_rank=self.dp_rank, dp_size=self.dp_size, micro_batch_size=self.micro_batch_size,
            consumed_samples=consumed_in_epoch, num_parallel_workers=self.num_parallel_workers, **section)
        return dataset

    def epoch_length(self):
        """Samples of one pass over the dataset that form whole steps (computed once)."""
        if self.epoch_samples is None:
            rank_samples = self._build(0).get_dataset_size()
            global_batches = rank_samples // self.micro_batch_size
            self.epoch_samples = (global_batches // self.accumulation_steps) * self.samples_per_step
        return self.epoch_samples

    def _open(self):
        position = self.consumed_samples
        if self.on_exhausted == "next_epoch":
            epoch = self.epoch_length()
            require(epoch > 0, "train_dataset", epoch, "holds no full training step of samples")
            position %= epoch
        dataset = self._build(position).batch(self.micro_batch_size, drop_remainder=True)
        self._iterator = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)

    def next_step(self):
        """Stacked [A, micro_batch_size, S] arrays of the next step, one per `model_columns` entry."""
        wrap = self.on_exhausted == "next_epoch"
        if self._iterator is None or (wrap and self._opened_at != self.consumed_samples
                                      and self.consumed_samples % self.epoch_length() == 0):
            self._open()
            self._opened_at = self.consumed_samples
        batches = []
        while len(batches) < self.accumulation_steps:
            batch = next(self._iterator, None)
            if batch is None:
                raise DataExhausted(
                    f"the training dataset is exhausted after {self.consumed_samples} samples; give "
                    "train_dataset.data_loader.sizes[0] more samples (null = as many as the run needs), lower "
                    "runner_config.train_steps, or set runner_config.data_exhausted: next_epoch")
            batches.append(batch)
        self.consumed_samples += self.samples_per_step
        return tuple(np.stack([batch[index] for batch in batches]).astype(COLUMN_DTYPES[name])
                     for index, name in enumerate(model_columns(self.section)))


# --- sizing a run: what the trainer asks of the data ----------------------------------------------------------

def loader_section(section, total_steps, samples_per_step):
    """`train_dataset.data_loader` with a null `sizes[0]` filled in as Megatron does:
    train_samples = iterations x global batch (left null while the run length is unknown)."""
    section = dict(section or {})
    sizes = list(section.get("sizes") or [None, 0, 0])
    if sizes[0] is None and total_steps is not None:
        sizes[0] = total_steps * samples_per_step
    section["sizes"] = sizes
    return section


def planned_steps(settings, dp):
    """`runner_config.train_steps`, or as many whole steps as `epochs` passes over the dataset hold.

    `settings` is a settings.RunSettings, `dp` a settings.DataParallelInfo."""
    if settings.train_steps is not None:
        return settings.train_steps
    samples_per_step = settings.samples_per_step(dp.size)
    probe = DataStream(loader_section(settings.data_loader, None, samples_per_step), dp.rank, dp.size,
                       settings.micro_batch_size, settings.accumulation_steps)
    steps = settings.epochs * probe.epoch_length() // samples_per_step
    require(steps > 0, "train_dataset", steps, "yields no full training step of "
            f"{samples_per_step} samples; use a larger dataset or a smaller batch")
    return steps


def training_stream(settings, dp, total_steps, consumed_samples=0):
    """This rank's DataStream for a run of `total_steps`, positioned at the global `consumed_samples`."""
    section = loader_section(settings.data_loader, total_steps, settings.samples_per_step(dp.size))
    return DataStream(section, dp.rank, dp.size, settings.micro_batch_size, settings.accumulation_steps,
                      consumed_samples, settings.on_data_exhausted, settings.num_parallel_workers)
