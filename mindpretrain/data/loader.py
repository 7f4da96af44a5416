"""Feed samples (GPT, packed SFT rows, MindRecord records, blends) to MindSpore, split across
data-parallel ranks, resumable mid-epoch.

The global sample order is fixed by the dataset (Megatron's shuffle), so sharding and resuming
are pure index arithmetic: global batch `b` is samples `consumed + b*G ... consumed + (b+1)*G - 1`
with `G = micro_batch_size * dp_size`, and rank `r` takes the `r`-th run of `micro_batch_size` of
them (Megatron's pretraining sampler). Resuming from `consumed_samples` therefore continues the
exact stream an uninterrupted run would have seen, on any number of ranks with the same G.
"""
import inspect

from mindpretrain.validation import ConfigError, require
from mindpretrain.data.dataset_builder import SPLIT_NAMES, build_datasets, dataset_kind
from mindpretrain.data.gpt_dataset import SAMPLE_COLUMNS
from mindpretrain.data.mindrecord_dataset import MindRecordDataset, find_mindrecord_files
from mindpretrain.data.sft_dataset import SFT_COLUMNS
from mindpretrain.registry import register

# The columns a loader yields unless `column_names` says otherwise.
DEFAULT_COLUMNS = {"GPTDataset": SAMPLE_COLUMNS, "SFTDataset": SFT_COLUMNS}


class DataParallelSamples:
    """Random-access view of the samples one data-parallel rank consumes, in order."""

    def __init__(self, dataset, columns=SAMPLE_COLUMNS, dp_rank=0, dp_size=1, micro_batch_size=1,
                 consumed_samples=0):
        require(isinstance(dp_size, int) and dp_size >= 1, "dp_size", dp_size, "must be a positive integer")
        require(isinstance(dp_rank, int) and 0 <= dp_rank < dp_size, "dp_rank", dp_rank,
                f"must be in [0, {dp_size})")
        require(isinstance(micro_batch_size, int) and micro_batch_size >= 1, "micro_batch_size",
                micro_batch_size, "must be a positive integer")
        self.global_batch = micro_batch_size * dp_size
        require(isinstance(consumed_samples, int) and consumed_samples >= 0
                and consumed_samples % self.global_batch == 0, "consumed_samples", consumed_samples,
                f"must be a non-negative multiple of micro_batch_size * dp_size ({self.global_batch})")
        require(consumed_samples <= len(dataset), "consumed_samples", consumed_samples,
                f"must not exceed the dataset's {len(dataset)} samples")
        self.dataset = dataset
        self.columns = tuple(columns)
        self.dp_rank, self.micro_batch_size = dp_rank, micro_batch_size
        self.consumed_samples = consumed_samples
        self.num_global_batches = (len(dataset) - consumed_samples) // self.global_batch

    def __len__(self):
        return self.num_global_batches * self.micro_batch_size

    def global_index(self, idx):
        """Position in the dataset of this rank's `idx`-th sample."""
        batch, within = divmod(idx, self.micro_batch_size)
        return (self.consumed_samples + batch * self.global_batch
                + self.dp_rank * self.micro_batch_size + within)

    def __getitem__(self, idx):
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples on rank {self.dp_rank}")
        sample = self.dataset[self.global_index(idx)]
        missing = [column for column in self.columns if column not in sample]
        if missing:
            raise ConfigError(f"input_columns {missing} are not produced by the dataset "
                              f"(it gives {sorted(sample)})")
        return tuple(sample[column] for column in self.columns)


@register("data_loader")
class BlendedMegatronDatasetDataLoader:
    """MindFormers' `BlendedMegatronDatasetDataLoader`: YAML section in, MindSpore dataset out.

    `datasets_type` GPTDataset (pretraining samples) or SFTDataset (packed fine-tuning rows). Returns a
    `mindspore.dataset.GeneratorDataset` yielding this rank's samples as the columns named in
    `column_names` (default: all the dataset type's columns); the caller batches it
    (`.batch(micro_batch_size, drop_remainder=True)`).
    """

    def __new__(cls, sizes, config, datasets_type="GPTDataset", phase="train", column_names=None,
                shuffle=False, dp_rank=0, dp_size=1, micro_batch_size=1, consumed_samples=0,
                num_parallel_workers=1):
        dataset_kind(datasets_type)
        require(not shuffle, "data_loader.shuffle", shuffle,
                "must be False: samples are already shuffled by the dataset's seeded index, and a second "
                "shuffle would break exact resume")
        require(phase in SPLIT_NAMES, "phase", phase, f"must be one of {SPLIT_NAMES}")
        dataset = build_datasets(config, sizes, datasets_type)[SPLIT_NAMES.index(phase)]
        if dataset is None:
            raise ConfigError(f"sizes ({sizes!r}) and split ({config.get('split')!r}) leave the {phase} "
                              f"dataset empty")
        columns = DEFAULT_COLUMNS[datasets_type] if column_names is None else column_names
        samples = DataParallelSamples(dataset, columns, dp_rank, dp_size, micro_batch_size, consumed_samples)
        return to_mindspore(samples, num_parallel_workers)


@register("data_loader")
class MindDataset:
    """MindFormers' MindRecord reader (its finetune YAMLs' `data_loader.type`): `dataset_dir` (or
    `dataset_files`) of `.mindrecord` files with `input_ids` and optionally `labels`, one SFT row per record
    (mindrecord_dataset.py), sharded and resumable like the BIN datasets.

    `shuffle: True` draws a seeded permutation of the records per epoch (`seed`), not MindSpore's order;
    `sizes[0]` samples beyond one pass repeat the records (null: one pass). `seq_length` (default: the
    longest record's length - 1) and `pad_token_id` (MindFormers' model_config.pad_token_id: input positions
    holding it are not trained) are ours; `path_to_cache` places the record arrays' cache.
    """

    def __new__(cls, dataset_dir=None, dataset_files=None, shuffle=False, seed=1234, seq_length=None,
                pad_token_id=None, path_to_cache=None, sizes=None, column_names=SFT_COLUMNS, dp_rank=0, dp_size=1,
                micro_batch_size=1, consumed_samples=0, num_parallel_workers=1, **unknown):
        if unknown:
            known = sorted(name for name, parameter in inspect.signature(cls.__new__).parameters.items()
                           if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and name != "cls")
            raise ConfigError(f"train_dataset.data_loader (MindDataset) has unknown keys {sorted(unknown)}; "
                              f"supported: {known}")
        require(isinstance(shuffle, bool), "data_loader.shuffle", shuffle, "must be True or False")
        sizes = list(sizes) if sizes is not None else [None, 0, 0]
        require(len(sizes) >= 1, "data_loader.sizes", sizes, "must start with the number of training samples")
        files = find_mindrecord_files(dataset_dir, dataset_files)
        dataset = MindRecordDataset(files, seq_length, pad_token_id, sizes[0], shuffle, seed, path_to_cache)
        samples = DataParallelSamples(dataset, column_names, dp_rank, dp_size, micro_batch_size, consumed_samples)
        return to_mindspore(samples, num_parallel_workers)


def to_mindspore(samples, num_parallel_workers=1):
    """A MindSpore GeneratorDataset over `samples`, in order (MindSpore is imported only here). The worker
    count is capped at the CPU count, which MindSpore's validator requires (RunSettings says so once)."""
    import os

    import mindspore.dataset as msd

    workers = max(1, min(int(num_parallel_workers or 1), os.cpu_count() or 1))
    return msd.GeneratorDataset(samples, column_names=list(samples.columns), shuffle=False,
                                num_parallel_workers=workers, python_multiprocessing=False)
