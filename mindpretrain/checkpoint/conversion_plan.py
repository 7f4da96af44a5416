"""Decide everything a conversion will do before one byte is written.

A conversion reads only safetensors headers here: it inventories the source (which tensor is in which file,
its stored dtype and shape), checks it against the table of expected names and shapes, and lays out the output
shards. Every problem found is collected, so a refused checkpoint comes with the complete list of offending
tensors instead of the first one; nothing is written for a source that does not fit.

The resulting plan (a list of `OutputShard`s made of `TensorJob`s) is plain data: the writer executes it shard by
shard, in any process, and the verifier checks the written files against it.
"""
import os
from collections import OrderedDict
from dataclasses import dataclass, field

from mindpretrain.checkpoint import fp8
from mindpretrain.checkpoint.safetensors_io import (INDEX_FILE, SafetensorsError, open_tensor_file, read_index,
                                                   weight_files)

FLOAT_SOURCE_DTYPES = ("F32", "BF16", "F16", "F8_E4M3")
ITEM_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}
LIST_LIMIT = 100   # offending tensors listed per category; the rest are counted


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked; the message lists every offending tensor."""


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of the source checkpoint, or (with `parts`) one derived from several by a foreign layout's
    `derive` (renamed, split, stacked; see `model_spec.WeightLayout`): `path` is then its first part's file."""
    name: str
    path: str
    dtype: str
    shape: tuple
    parts: tuple = ()
    derive: object = None

    def paths(self):
        return [part.path for part in self.parts] if self.parts else [self.path]


def translate_sources(found, layout, model_config, problems):
    """`found` seen under native names through a foreign `layout`; what it cannot place goes to `problems`."""
    derived, unconsumed, misshaped = layout.translate(model_config, {name: t.shape for name, t in found.items()})
    for text in misshaped:
        problems.add("wrong shape", text)
    for name in unconsumed:
        problems.add(f"unexpected (a {layout.name} name no tensor of this model reads)",
                     f"{name} {list(found[name].shape)}")
    translated = OrderedDict()
    for name, recipe in derived.items():
        parts = tuple(found[source] for source in recipe.sources)
        dtypes = {part.dtype for part in parts}
        translated[name] = SourceTensor(name, parts[0].path, dtypes.pop() if len(dtypes) == 1 else "F32",
                                        tuple(recipe.shape), parts, recipe.derive)
    return translated


@dataclass
class TensorJob:
    """One output tensor (plus its `_scale_inv` when `quantise`), produced from one source tensor."""
    name: str
    source: SourceTensor
    out_dtype: str                       # "F32" | "BF16" | "F8_E4M3"
    scale: SourceTensor = None           # the source's `_scale_inv` when the source is fp8
    quantise: bool = False               # write fp8 codes + `<name>_scale_inv` (float32)

    @property
    def shape(self):
        return self.source.shape

    def outputs(self):
        """[(name, dtype, shape)] this job writes, in file order."""
        if self.quantise:
            return [(self.name, "F8_E4M3", self.shape),
                    (self.name + fp8.SCALE_SUFFIX, "F32", fp8.scale_shape(self.shape))]
        return [(self.name, self.out_dtype, self.shape)]

    def nbytes(self):
        return sum(ITEM_SIZE[dtype] * _numel(shape) for _, dtype, shape in self.outputs())


@dataclass
class OutputShard:
    file_name: str
    jobs: list = field(default_factory=list)

    def entries(self):
        return [entry for job in self.jobs for entry in job.outputs()]

    def nbytes(self):
        return sum(job.nbytes() for job in self.jobs)


def _numel(shape):
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


class Problems:
    """Collects offending tensors by category and renders one message."""

    def __init__(self):
        self._items = OrderedDict()

    def add(self, category, text):
        self._items.setdefault(category, []).append(text)

    def __bool__(self):
        return bool(self._items)

    def raise_if_any(self, headline):
        if not self._items:
            return
        count = sum(len(items) for items in self._items.values())
        lines = [f"{headline}: {count} problem(s); nothing was written."]
        for category, items in self._items.items():
            lines.append(f"  {category} ({len(items)}):")
            lines += [f"    {item}" for item in items[:LIST_LIMIT]]
            if len(items) > LIST_LIMIT:
                lines.append(f"    ... and {len(items) - LIST_LIMIT} more")
        raise ConversionError("\n".join(lines))


def inventory(directory, problems, file_filter=None):
    """OrderedDict name -> SourceTensor of a checkpoint directory (safetensors, or one MindSpore .ckpt), in file order.

    With an index, only the files it names are read, every name it lists must be in the file it names, and a
    name stored in two files is reported. Unreadable or truncated shards are reported, not raised.
    """
    directory = str(directory)
    if not os.path.isdir(directory):
        raise ConversionError(f"checkpoint directory {directory} does not exist")
    try:
        weight_map = read_index(directory)
    except SafetensorsError as error:
        raise ConversionError(str(error)) from None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    else:
        try:
            files = [os.path.relpath(path, directory) for path in weight_files(directory)]
        except SafetensorsError as error:
            raise ConversionError(str(error)) from None
    if file_filter is not None:
        files = [name for name in files if file_filter(name)]
    if not files:
        raise ConversionError(f"{directory} holds no *.safetensors file and no MindSpore .ckpt file")
    found = OrderedDict()
    for file_name in files:
        path = os.path.join(directory, file_name)
        if not os.path.isfile(path):
            problems.add("missing shard files", f"{file_name} (named by {INDEX_FILE})")
            continue
        try:
            with open_tensor_file(path) as handle:
                for name in handle.keys():
                    dtype, shape = handle.info(name)
                    if name in found:
                        problems.add("stored more than once", f"{name}: in {os.path.basename(found[name].path)} "
                                                             f"and {file_name}")
                        continue
                    found[name] = SourceTensor(name, path, dtype, tuple(shape))
        except SafetensorsError as error:
            problems.add("unreadable shards", str(error))
    if weight_map is not None:
        for name, file_name in weight_map.items():
            tensor = found.get(name)
            if tensor is None:
                if os.path.isfile(os.path.join(directory, file_name)):
                    problems.add("listed in the index but absent from their shard", f"{name} (index: {file_name})")
            elif os.path.basename(tensor.path) != file_name:
                problems.add("in a different shard than the index says",
                             f"{name}: index {file_name}, stored in {os.path.basename(tensor.path)}")
        for name in found:
            if name not in weight_map:
                problems.add("stored but missing from the index", name)
    return found


def match_sources(found, expected_shapes, problems, duplicates=None, ignored_prefixes=()):
    """Pair each expected tensor with its source (and fp8 scale); report missing/unexpected/misshaped/bad dtypes.

    `duplicates` {copy name: original name}: tensors the source may hold as copies of another (the release's MTP
    embedding/head); they are returned separately for checking. Returns (sources {name: (tensor, scale)},
    duplicate_sources {copy: SourceTensor}).
    """
    duplicates = duplicates or {}
    sources, duplicate_sources = OrderedDict(), OrderedDict()
    scales = {name[: -len(fp8.SCALE_SUFFIX)]: tensor for name, tensor in found.items()
              if name.endswith(fp8.SCALE_SUFFIX)}
    for name in expected_shapes:
        if name not in found:
            problems.add("missing", f"{name} {list(expected_shapes[name])}")
    for name, tensor in found.items():
        if name.endswith(fp8.SCALE_SUFFIX) or name.startswith(tuple(ignored_prefixes)):
            continue
        if name in duplicates and name not in expected_shapes:
            duplicate_sources[name] = tensor
            expected = expected_shapes.get(duplicates[name])
        elif name in expected_shapes:
            expected = expected_shapes[name]
        else:
            problems.add("unexpected (not in this model configuration)", f"{name} {list(tensor.shape)}")
            continue
        if expected is not None and tuple(expected) != tensor.shape:
            problems.add("wrong shape", f"{name}: {list(tensor.shape)} in the checkpoint, {list(expected)} expected")
            continue
        scale = scales.get(name)
        if tensor.dtype not in FLOAT_SOURCE_DTYPES:
            problems.add("unsupported dtype", f"{name}: {tensor.dtype} (expected one of F32, BF16, F16, "
                                              "F8_E4M3 with a _scale_inv)")
        elif tensor.dtype == "F8_E4M3":
            if scale is None:
                problems.add("fp8 without scale", f"{name} has no {name}{fp8.SCALE_SUFFIX}")
            else:
                message = fp8.check_scale_shape(name, tensor.shape, scale.shape)
                if message:
                    problems.add("wrong scale shape", message)
                elif scale.dtype not in ("F32", "BF16"):
                    problems.add("unsupported dtype", f"{scale.name}: {scale.dtype} (expected F32)")
        elif scale is not None:
            problems.add("scale without fp8 weight", f"{scale.name}: {name} is {tensor.dtype}, not F8_E4M3")
        if name in expected_shapes:
            sources[name] = (tensor, scale if tensor.dtype == "F8_E4M3" else None)
    for base, scale in scales.items():
        if base not in found and not scale.name.startswith(tuple(ignored_prefixes)):
            problems.add("scale without fp8 weight", f"{scale.name}: no tensor {base}")
    return sources, duplicate_sources


def layout_shards(jobs, max_shard_bytes):
    """Pack jobs (in order) into output shards of at most `max_shard_bytes` (a bigger single tensor gets its own
    shard), named `model-0000i-of-0000n.safetensors` as transformers and the release name them. Jobs are first
    grouped by source file so each shard reads from as few files as possible."""
    shards, current, size = [], [], 0
    previous_file = None
    for job in jobs:
        nbytes = job.nbytes()
        crosses_file = previous_file is not None and job.source.path != previous_file
        if current and (size + nbytes > max_shard_bytes or (crosses_file and size >= max_shard_bytes / 2)):
            shards.append(current)
            current, size = [], 0
        current.append(job)
        size += nbytes
        previous_file = job.source.path
    if current:
        shards.append(current)
    total = len(shards)
    return [OutputShard(f"model-{i + 1:05d}-of-{total:05d}.safetensors", jobs) for i, jobs in enumerate(shards)]


def parse_size(text):
    """'5GB', '500MB', '4.5G', '1024' (bytes) -> int bytes (decimal units, as transformers' max_shard_size)."""
    units = {"": 1, "B": 1, "KB": 10 ** 3, "K": 10 ** 3, "MB": 10 ** 6, "M": 10 ** 6, "GB": 10 ** 9, "G": 10 ** 9,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    value = str(text).strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        result = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ConversionError(f"max shard size ({text!r}) must look like 5GB, 500MB or a number of bytes") from None
    if result <= 0:
        raise ConversionError(f"max shard size ({text!r}) must be positive")
    return result
