"""MindFormers' fine-tuning data as it ships (`data_loader.type: MindDataset`), read as SFT rows.

MindFormers' finetune YAMLs read `.mindrecord` files written by its converters (for DeepSeek-V3,
research/deepseek3/deepseek3_preprocess.py): each record holds `input_ids` of seq_length + 1 tokens,
right-padded with pad_token_id, and for instruction data `labels` of the same length: input_ids with
IGNORE_INDEX (-100) on every token that is not a target (BOS, prompt, padding). Its model shifts
them itself (`tokens = input_ids[:-1]`, `labels = labels[1:]`) and trains position p when
`labels[p + 1] != -100` and `input_ids[p] != pad_token_id`; records without `labels` train every
non-pad position on the next token.

Here that shift is done once, so one record of L tokens becomes one row of the SFT contract
(sft_dataset.py) whose document is its first L - 1 tokens: `loss_mask` is MindFormers' mask,
`labels[p]` is `labels[p + 1]` (the next input token where that is -100), `position_ids` run
0..L-2 and `actual_seq_len` is L - 1 throughout. A row holds seq_length = L - 1 positions (the
longest record's, unless `seq_length` is given; shorter records are padded and their padding is
never trained), so records of seq_length + 1 tokens give exactly MindFormers' inputs.

MindRecord files are read sequentially, so the records are copied once, in MindSpore's
`shuffle=False` order, into memory-mapped arrays cached next to the data (index_cache.py); rows are
then random-access and the loader shards and resumes them like every other dataset.
"""
import os
import re

import numpy as np

from mindpretrain.validation import ConfigError, require
from mindpretrain.data.index_cache import IndexCache, file_digest
from mindpretrain.data.sft_dataset import IGNORE_INDEX, ROW_ORDER_STREAM
from mindpretrain.utils.logging import get_logger

logger = get_logger("data")

MINDRECORD_FILE = re.compile(r"mindrecord\d*$")   # MindFormers' pattern: data files, not their .db indices


def find_mindrecord_files(dataset_dir=None, dataset_files=None):
    """MindFormers' file discovery: every `*mindrecord[N]` file under `dataset_dir` (sorted), or that one
    file, or the `dataset_files` list. A single file stands for its whole set (MindSpore opens its shards)."""
    if dataset_dir:
        if os.path.isdir(dataset_dir):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(dataset_dir)
                           for name in names if MINDRECORD_FILE.search(name))
        else:
            found = [dataset_dir] if MINDRECORD_FILE.search(dataset_dir) and os.path.isfile(dataset_dir) else []
        require(found, "train_dataset.data_loader.dataset_dir", dataset_dir,
                "must be a .mindrecord file or a directory holding some")
        return found
    require(dataset_files, "train_dataset.data_loader.dataset_files", dataset_files,
            "or dataset_dir must name the MindRecord files")
    files = [dataset_files] if isinstance(dataset_files, str) else [str(path) for path in dataset_files]
    missing = [path for path in files if not os.path.isfile(path)]
    require(not missing, "train_dataset.data_loader.dataset_files", missing, "do not exist")
    return files


def read_records(files):
    """All records' `input_ids` and `labels` (None when the files have no labels column), in order."""
    import mindspore.dataset as msd

    source = files[0] if len(files) == 1 else list(files)
    columns = msd.MindDataset(source, shuffle=False).get_col_names()
    require("input_ids" in columns, "MindRecord columns", columns, "must include input_ids")
    wanted = ["input_ids"] + (["labels"] if "labels" in columns else [])
    reader = msd.MindDataset(source, columns_list=wanted, shuffle=False, num_parallel_workers=1)
    input_ids, labels = [], []
    for record in reader.create_dict_iterator(num_epochs=1, output_numpy=True):
        input_ids.append(np.asarray(record["input_ids"], dtype=np.int32).reshape(-1))
        if "labels" in record:
            labels.append(np.asarray(record["labels"], dtype=np.int32).reshape(-1))
    return input_ids, (labels if "labels" in wanted else None)


def _flatten(input_ids, labels, files):
    require(input_ids, "MindRecord files", files, "hold no records")
    lengths = np.array([len(ids) for ids in input_ids], dtype=np.int64)
    if labels is not None:
        for number, (ids, label) in enumerate(zip(input_ids, labels)):
            if len(label) != len(ids):
                raise ConfigError(f"MindRecord record {number} of {files[0]}...: labels has {len(label)} tokens, "
                                  f"input_ids {len(ids)}; they must be the same length (unshifted)")
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return {"input_ids": np.concatenate(input_ids), "offsets": offsets,
            "labels": np.concatenate(labels) if labels is not None else np.zeros(0, dtype=np.int32)}


class MindRecordDataset:
    """One SFT row per MindRecord record; `dataset[i]` is a dict of the five sft_dataset.SFT_COLUMNS arrays."""

    def __init__(self, files, seq_length=None, pad_token_id=None, num_samples=None, shuffle=False, seed=1234,
                 path_to_cache=None):
        self.files = [os.path.abspath(path) for path in files]
        require(seq_length is None or (isinstance(seq_length, int) and seq_length > 0), "seq_length", seq_length,
                "must be a positive integer or null (the longest record's length - 1)")
        require(pad_token_id is None or isinstance(pad_token_id, int), "pad_token_id", pad_token_id,
                "must be a token id or null")
        require(isinstance(seed, int) and 0 <= seed < 2 ** 32, "seed", seed, "must be an integer in [0, 2**32)")
        require(num_samples is None or (isinstance(num_samples, int) and num_samples >= 0), "sizes[0]",
                num_samples, "must be a non-negative number of samples or null")
        self.pad_token_id = pad_token_id
        self.path_to_cache = path_to_cache
        self._load_or_read()
        lengths = np.diff(self.offsets)
        self._check_lengths(lengths, seq_length)
        self.seq_length = int(seq_length or lengths.max() - 1)
        self.sample_index = _row_order(self.num_records, num_samples, shuffle, seed)

    def _description(self):
        stats = [(path, os.path.getsize(path), os.stat(path).st_mtime_ns) for path in self.files]
        indices = [file_digest(path + ".db") for path in self.files if os.path.isfile(path + ".db")]
        return {"class": "MindRecordDataset", "files": stats, "db_digests": indices}

    def cache_directory(self):
        if self.path_to_cache:
            return self.path_to_cache
        return os.path.join(os.path.dirname(self.files[0]), "cache", "MindRecord_arrays")

    def _load_or_read(self):
        names = ("input_ids", "labels", "offsets")
        cache = IndexCache(self.cache_directory(), "MindRecordDataset", self._description())
        arrays = cache.load(names)
        if arrays is None:
            arrays = _flatten(*read_records(self.files), self.files)
            cache.save(arrays)
            logger.info("copied %d MindRecord records (%d tokens) from %s into %s", len(arrays["offsets"]) - 1,
                        len(arrays["input_ids"]), self.files[0], self.cache_directory())
        self.input_ids, self.offsets = arrays["input_ids"], arrays["offsets"]
        self.labels = arrays["labels"] if len(arrays["labels"]) else None

    def _check_lengths(self, lengths, seq_length):
        short = np.flatnonzero(lengths < 2)
        if short.size:
            raise ConfigError(f"MindRecord record {int(short[0])} of {self.files[0]} has {int(lengths[short[0]])} "
                              "tokens; a record needs at least 2 (inputs plus the shifted label)")
        if seq_length is not None:
            long = np.flatnonzero(lengths > seq_length + 1)
            if long.size:
                raise ConfigError(f"MindRecord record {int(long[0])} of {self.files[0]} has "
                                  f"{int(lengths[long[0]])} tokens, more than seq_length {seq_length} + 1")

    @property
    def num_records(self):
        return len(self.offsets) - 1

    def __len__(self):
        return len(self.sample_index)

    def record(self, number):
        """(input_ids, labels) of record `number`, labels None when the files have none."""
        start, stop = int(self.offsets[number]), int(self.offsets[number + 1])
        labels = None if self.labels is None else np.asarray(self.labels[start:stop])
        return np.asarray(self.input_ids[start:stop]), labels

    def __getitem__(self, idx):
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        input_ids, labels = self.record(int(self.sample_index[idx]))
        return mindrecord_row(input_ids, labels, self.seq_length, self.pad_token_id)


def _row_order(num_records, num_samples, shuffle, seed):
    """Records per epoch in file order, or a seeded permutation per epoch; whole epochs up to num_samples."""
    epochs = 1 if num_samples is None else max(1, -(-num_samples // num_records))
    if not shuffle:
        return np.tile(np.arange(num_records, dtype=np.int64), epochs)
    random_state = np.random.RandomState([seed, ROW_ORDER_STREAM])
    return np.concatenate([random_state.permutation(num_records) for _ in range(epochs)]).astype(np.int64)


def mindrecord_row(input_ids, labels, seq_length, pad_token_id=None):
    """The SFT row of one record: MindFormers' shift and mask, one document of len(input_ids) - 1 positions."""
    size = len(input_ids) - 1
    inputs, following = input_ids[:size], input_ids[1:]
    shifted = following if labels is None else labels[1:]
    target = shifted != IGNORE_INDEX
    if pad_token_id is not None:
        target &= inputs != pad_token_id
    row = {"input_ids": np.full(seq_length, 0 if pad_token_id is None else pad_token_id, dtype=np.int32),
           "labels": np.full(seq_length, IGNORE_INDEX, dtype=np.int32),
           "loss_mask": np.zeros(seq_length, dtype=np.float32),
           "position_ids": np.zeros(seq_length, dtype=np.int32),
           "actual_seq_len": np.full(seq_length, size, dtype=np.int32)}
    row["input_ids"][:size] = inputs
    row["labels"][:size] = np.where(shifted != IGNORE_INDEX, shifted, following)
    row["loss_mask"][:size] = target
    row["position_ids"][:size] = np.arange(size, dtype=np.int32)
    return row
