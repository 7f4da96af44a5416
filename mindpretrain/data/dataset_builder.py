"""Turn the `data_loader.config` section (data_path blend, split, sizes) into train/valid/test datasets.

Megatron's rules, so the same YAML selects the same data anywhere:
- `data_path: [prefix]` uses one dataset as is; `data_path: [w1, p1, w2, p2, ...]` blends them (weights
  may be numbers or numeric strings, `['1', './dataset']` as MindFormers' YAMLs write them):
  dataset i is due `ceil(size * w_i)` samples, is built with 0.5 % more so that the error-greedy
  blend never runs it dry, and the blend holds the sum of the dues (Megatron-Core 0.16's rule; it
  can exceed `size` by a few samples).
- `split: "969, 30, 1"` divides each dataset's documents (not samples) into train/valid/test.
- `train_data_path` / `valid_data_path` / `test_data_path` give each split a blend of its own
  (whole datasets, no `split`).
- `sizes: [train, valid, test]` are sample counts; 0 skips a split; null means one epoch.

`datasets_type` picks what a prefix holds: `GPTDataset` (a Megatron BIN dataset, pretraining samples)
or `SFTDataset` (the fine-tuning preprocessor's output prefix P: P_input_ids_document.* and
P_loss_mask_document.*, packed rows). Both take the same blend, split and sizes rules.
"""
import collections
import math

import numpy as np

from mindpretrain.mindformers_keys import PARTIAL_VOCABULARY
from mindpretrain.validation import ConfigError, require
from mindpretrain.data.blended_dataset import BlendedDataset, normalize_weights
from mindpretrain.data.gpt_dataset import GPTDataset, GPTDatasetConfig, split_document_ranges
from mindpretrain.data.indexed_dataset import IndexedDataset
from mindpretrain.data.sft_dataset import SFTDataset, SFTDatasetConfig, SFTDocuments
from mindpretrain.utils.open_once import OpenOnce

SPLIT_NAMES = ("train", "valid", "test")
BLEND_SURPLUS = 0.005

# `data_loader.config` keys that are not dataset config fields.
_BLEND_KEYS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")
_IGNORED_KEYS = tuple(PARTIAL_VOCABULARY["train_dataset.data_loader.config"])   # accepted, no effect

# What a `datasets_type` needs: its config class, how a prefix is opened, the dataset class.
DatasetKind = collections.namedtuple("DatasetKind", "config_class opener dataset_class")
DATASET_KINDS = {"GPTDataset": DatasetKind(GPTDatasetConfig, IndexedDataset, GPTDataset),
                 "SFTDataset": DatasetKind(SFTDatasetConfig, SFTDocuments, SFTDataset)}


def parse_blend(data_path, key="data_path"):
    """`[prefix]` → ([prefix], None); `[w1, p1, w2, p2]` → ([p1, p2], [w1, w2])."""
    if data_path is None:
        return None
    if isinstance(data_path, str):
        data_path = [data_path]
    require(isinstance(data_path, (list, tuple)) and len(data_path) > 0, key, data_path,
            "must be a non-empty list: [prefix] or [weight1, prefix1, weight2, prefix2, ...]")
    if len(data_path) == 1:
        return [str(data_path[0])], None
    require(len(data_path) % 2 == 0, key, data_path,
            "must alternate weights and prefixes ([weight1, prefix1, weight2, prefix2, ...])")
    weights, prefixes = [], []
    for position in range(0, len(data_path), 2):
        raw_weight, prefix = data_path[position], data_path[position + 1]
        try:
            weight = float(raw_weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} ({data_path!r}) must alternate weights and prefixes; "
                              f"{raw_weight!r} at position {position} is not a number") from None
        require(math.isfinite(weight) and weight > 0, f"{key}[{position}]", raw_weight,
                "must be a finite, positive weight")
        weights.append(weight)
        prefixes.append(str(prefix))
    return prefixes, weights


def dataset_config(section, config_class=GPTDatasetConfig):
    """`config_class` (GPTDatasetConfig, SFTDatasetConfig) from a MindFormers `data_loader.config` mapping;
    `seed` is an alias of `random_seed`, and unknown keys are refused with the list of known ones."""
    section = dict(section)
    if "seed" in section and "random_seed" not in section:
        section["random_seed"] = section.pop("seed")
    fields = {field for field in config_class.__dataclass_fields__}
    unknown = sorted(set(section) - fields - set(_BLEND_KEYS) - set(_IGNORED_KEYS))
    if unknown:
        raise ConfigError(f"data_loader.config has unknown keys {unknown}; supported: "
                          f"{sorted(fields | set(_BLEND_KEYS) | {'seed'})}")
    return config_class(**{key: value for key, value in section.items() if key in fields})


def dataset_kind(datasets_type):
    require(datasets_type in DATASET_KINDS, "datasets_type", datasets_type,
            f"must be one of {', '.join(DATASET_KINDS)}")
    return DATASET_KINDS[datasets_type]


def _check_sizes(sizes):
    require(isinstance(sizes, (list, tuple)) and len(sizes) == 3, "sizes", sizes,
            "must list three sample counts: [train, valid, test]")
    for name, size in zip(SPLIT_NAMES, sizes):
        require(size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 0),
                f"sizes ({name})", size, "must be a non-negative integer or null")
    return list(sizes)


def build_gpt_datasets(section, sizes):
    """[train, valid, test] GPTDatasets (None where a split is empty or not requested)."""
    return build_datasets(section, sizes, "GPTDataset")


def build_datasets(section, sizes, datasets_type="GPTDataset"):
    """[train, valid, test] datasets of `datasets_type` (None where a split is empty or not requested)."""
    kind = dataset_kind(datasets_type)
    config = dataset_config(section, kind.config_class)
    sizes = _check_sizes(sizes)

    def make(dataset, documents, size, name):
        return kind.dataset_class(dataset, documents, size, config, name)

    opener = OpenOnce(kind.opener)   # each prefix opened once, however many splits and blends use it
    per_split = [parse_blend(section.get(f"{name}_data_path"), f"{name}_data_path") for name in SPLIT_NAMES]
    if any(blend is not None for blend in per_split):
        require(section.get("data_path") is None, "data_path", section.get("data_path"),
                "must be left out when train_data_path/valid_data_path/test_data_path are given")
        return [_build_whole_blend(opener, blend, size, make, name)
                for blend, size, name in zip(per_split, sizes, SPLIT_NAMES)]
    blend = parse_blend(section.get("data_path"))
    require(blend is not None, "data_path", None, "must name at least one dataset prefix")
    prefixes, weights = blend
    require(config.split is not None, "split", None, "must be given with data_path")
    if weights is None:
        return _build_splits(opener(prefixes[0]), sizes, config.split, make)
    for size, name in zip(sizes, SPLIT_NAMES):
        require(size is not None, f"sizes ({name})", size, "must be a number of samples when data_path blends")
    weights = normalize_weights(weights)
    per_dataset = [_build_splits(opener(prefix), [_with_surplus(_due(size, weight)) for size in sizes],
                                 config.split, make)
                   for prefix, weight in zip(prefixes, weights)]
    result = []
    for split_number, (size, name) in enumerate(zip(sizes, SPLIT_NAMES)):
        members = [splits[split_number] for splits in per_dataset]
        if size == 0 or any(member is None for member in members):
            result.append(None)
            continue
        blend_size = sum(_due(size, weight) for weight in weights)
        result.append(_blend(members, weights, blend_size, name))
    return result


def _due(size, weight):
    """Samples a blend of `size` owes a dataset of (normalised) `weight`."""
    return int(math.ceil(size * weight))


def _with_surplus(count):
    return int(math.ceil(count * (1 + BLEND_SURPLUS)))


def _build_splits(dataset, sizes, split, make):
    ranges = split_document_ranges(split, len(dataset))
    datasets = []
    for document_range, size, name in zip(ranges, sizes, SPLIT_NAMES):
        if document_range is None or size == 0:
            datasets.append(None)
            continue
        documents = np.arange(*document_range, dtype=np.int32)
        datasets.append(make(dataset, documents, size, name))
    return datasets


def _build_whole_blend(opener, blend, size, make, name):
    if blend is None or size == 0:
        return None
    prefixes, weights = blend
    if weights is None:
        dataset = opener(prefixes[0])
        return make(dataset, np.arange(len(dataset), dtype=np.int32), size, name)
    require(size is not None, f"sizes ({name})", size, "must be a number of samples when a split blends")
    weights = normalize_weights(weights)
    members = []
    for prefix, weight in zip(prefixes, weights):
        dataset = opener(prefix)
        members.append(make(dataset, np.arange(len(dataset), dtype=np.int32), _with_surplus(_due(size, weight)),
                            name))
    return _blend(members, weights, sum(_due(size, weight) for weight in weights), name)


def _blend(members, weights, size, name):
    description = [member.description() for member in members]
    cache_directory = members[0].cache_directory()
    return BlendedDataset(members, weights, size, cache_directory=cache_directory,
                          description={"split": name, "members": description})
