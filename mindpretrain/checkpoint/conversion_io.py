"""Execute a conversion plan: stream each output shard from memory-mapped sources, slab by slab.

Why a writer of its own next to `safetensors_io.SafetensorsWriter`: a conversion knows every output name, dtype
and shape before it starts (the plan), so the header can be written first and tensor bytes streamed straight
behind it in slabs of ~64 MB. Nothing of a shard is held in memory and nothing is written twice (the generic
writer appends to a scratch file and copies it behind the header at close). Reading goes through safetensors_io's
memory-mapped `open_safetensors`; peak memory is the pages of the source shard touched so far plus one slab.
"""
import json
import os

import numpy as np

from mindpretrain.checkpoint import fp8
from mindpretrain.checkpoint.conversion_plan import ITEM_SIZE, ConversionError
from mindpretrain.checkpoint.safetensors_io import (
    INDEX_FILE, OpenFiles, SafetensorsError, bf16_bits_to_float32, decode, encode_header, float32_to_bf16_bits,
    open_safetensors, read_index)

SLAB_BYTES = 8 * 1024 * 1024       # float32 bytes per slab (whole 128-row fp8 blocks); small enough to stay in
                                   # cache and in the malloc heap (bigger temporaries are fresh mmaps: page faults)


class PlannedShardWriter:
    """Writes a safetensors file whose entries are known up front: header first, then the bytes in order."""

    def __init__(self, path, entries, metadata=None):
        self.path = path
        header, offset = {}, 0
        self._sizes = []
        for name, dtype, shape in entries:
            nbytes = ITEM_SIZE[dtype] * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, nbytes))
            offset += nbytes
        self._handle = open(path, "wb")
        self._handle.write(encode_header(header, metadata))
        self._entry = 0
        self._written = 0

    def write(self, array):
        """Append the bytes of `array` (C-contiguous) to the current entry; entries advance when full."""
        array = np.ascontiguousarray(array)
        if self._entry >= len(self._sizes):
            raise ConversionError(f"{self.path}: more data than planned")
        name, size = self._sizes[self._entry]
        if self._written + array.nbytes > size:
            raise ConversionError(f"{self.path}: tensor {name} gets {self._written + array.nbytes} bytes, "
                                  f"{size} planned")
        self._handle.write(memoryview(array.reshape(-1)).cast("B"))
        self._written += array.nbytes
        if self._written == size:
            self._entry += 1
            self._written = 0

    def close(self):
        if self._entry != len(self._sizes):
            name = self._sizes[self._entry][0]
            self._handle.close()
            raise ConversionError(f"{self.path}: tensor {name} was not completely written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def abort(self):
        self._handle.close()


def _rows_per_slab(shape):
    if len(shape) < 2:
        return max(1, shape[0] if shape else 1)
    row_elems = int(np.prod(shape[1:], dtype=np.int64))
    rows = SLAB_BYTES // (4 * max(1, row_elems))
    return max(fp8.BLOCK, rows // fp8.BLOCK * fp8.BLOCK)


def stored_bits(readers, tensor):
    """The stored bits of a source tensor (memory-mapped), or of a derived one (built from its parts in memory;
    parts of mixed dtypes are widened to float32 first, which is then the derived tensor's dtype)."""
    if not tensor.parts:
        return readers(tensor.path).get_raw(tensor.name)
    parts = [stored_bits(readers, part) for part in tensor.parts]
    if any(part.dtype != tensor.dtype for part in tensor.parts):
        parts = [decode(part.dtype, bits).astype(np.float32) for part, bits in zip(tensor.parts, parts)]
    return tensor.derive(*parts)


def float_slabs(readers, tensor, scale=None):
    """Yield (row_start, float32 slab) of a source tensor: fp8 dequantised with its scale, bf16/f16 widened."""
    raw = stored_bits(readers, tensor)
    scale_values = None
    if tensor.dtype == "F8_E4M3":
        scale_raw = readers(scale.path).get_raw(scale.name)
        scale_values = bf16_bits_to_float32(scale_raw) if scale.dtype == "BF16" else np.asarray(scale_raw, np.float32)
    if raw.ndim == 0:
        raw = raw.reshape(1)
    step = _rows_per_slab(raw.shape)
    for start in range(0, raw.shape[0], step):
        part = raw[start:start + step]
        if tensor.dtype == "F8_E4M3":
            yield start, fp8.dequantise_rows(part, scale_values, start)
        elif tensor.dtype == "BF16":
            yield start, bf16_bits_to_float32(part)
        else:
            yield start, np.asarray(part, dtype=np.float32)


def raw_slabs(readers, tensor):
    """Yield the stored bits of a source tensor in slabs (for dtype-preserving copies)."""
    raw = stored_bits(readers, tensor)
    if raw.ndim == 0:
        yield raw.reshape(1)
        return
    step = _rows_per_slab(raw.shape)
    for start in range(0, raw.shape[0], step):
        yield raw[start:start + step]


def write_job(readers, writer, job):
    """Produce one job's output tensor(s) into `writer`."""
    source = job.source
    if job.quantise:
        scales = np.empty(fp8.scale_shape(job.shape), dtype=np.float32)
        for start, values in float_slabs(readers, source, job.scale):
            for offset in range(0, values.shape[0], fp8.BLOCK):
                codes, block_scales = fp8.quantise_rows(values[offset:offset + fp8.BLOCK])
                scales[(start + offset) // fp8.BLOCK] = block_scales
                writer.write(codes)
        writer.write(scales)
        return
    if source.dtype == job.out_dtype and source.dtype in ("F32", "BF16"):
        for bits in raw_slabs(readers, source):
            writer.write(bits)
        return
    for _, values in float_slabs(readers, source, job.scale):
        if job.out_dtype == "F32":
            writer.write(values)
        elif job.out_dtype == "BF16":
            writer.write(float32_to_bf16_bits(values))
        else:
            raise ConversionError(f"{job.name}: cannot write dtype {job.out_dtype}")


def write_shard(shard, directory, metadata=None, on_tensor=None):
    """Write one planned shard into `directory`; `on_tensor(job)` after each tensor (progress)."""
    path = os.path.join(directory, shard.file_name)
    writer = PlannedShardWriter(path, shard.entries(), metadata)
    readers = OpenFiles()
    last_use = {}
    for position, job in enumerate(shard.jobs):
        for source in (job.source, job.scale):
            for source_path in source.paths() if source is not None else ():
                last_use[source_path] = position
    try:
        for position, job in enumerate(shard.jobs):
            try:
                write_job(readers, writer, job)
            except (SafetensorsError, ValueError) as error:
                raise ConversionError(f"while writing {job.name} from {job.source.path}: {error}") from None
            for source_path in [p for p, last in last_use.items() if last == position]:
                readers.release(source_path)        # an output shard spanning several sources holds one at a time
            if on_tensor is not None:
                on_tensor(job)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        readers.close()
    return shard.file_name


def write_index(directory, shards, metadata=None):
    weight_map = {name: shard.file_name for shard in shards for name, _, _ in shard.entries()}
    total = sum(shard.nbytes() for shard in shards)
    content = {"metadata": dict(metadata or {}, total_size=total), "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
        handle.write("\n")


def verify_written(directory, shards, required_names):
    """Re-open every written shard: planned names, dtypes and shapes, each name exactly once, and every
    `required_names` present. Raises ConversionError listing any difference."""
    problems, seen = [], {}
    for shard in shards:
        path = os.path.join(directory, shard.file_name)
        try:
            with open_safetensors(path) as handle:
                stored = {name: handle.info(name) for name in handle.keys()}
        except SafetensorsError as error:
            problems.append(str(error))
            continue
        planned = {name: (dtype, tuple(shape)) for name, dtype, shape in shard.entries()}
        for name, (dtype, shape) in planned.items():
            if name not in stored:
                problems.append(f"{shard.file_name}: {name} was not written")
            elif (stored[name][0], tuple(stored[name][1])) != (dtype, shape):
                problems.append(f"{shard.file_name}: {name} is {stored[name][0]}{list(stored[name][1])}, "
                                f"planned {dtype}{list(shape)}")
        for name in stored:
            if name not in planned:
                problems.append(f"{shard.file_name}: unplanned tensor {name}")
            if name in seen:
                problems.append(f"{name} written twice ({seen[name]} and {shard.file_name})")
            seen[name] = shard.file_name
    if read_index(directory) != seen:
        problems.append("model.safetensors.index.json does not match the written shards")
    problems += [f"{name} is missing from the output" for name in required_names if name not in seen]
    if problems:
        raise ConversionError("verification of the written checkpoint failed:\n  " + "\n  ".join(problems[:100]))
    return len(seen)


def compare_tensors(readers, first, second):
    """(identical bits?, max |difference| as float) of two same-shape source tensors, slab by slab."""
    if first.dtype == second.dtype and first.dtype in ("F32", "BF16", "F16"):
        identical = all(np.array_equal(a, b) for a, b in zip(raw_slabs(readers, first), raw_slabs(readers, second)))
        if identical:
            return True, 0.0
    worst = 0.0
    for (_, a), (_, b) in zip(float_slabs(readers, first), float_slabs(readers, second)):
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
    return worst == 0.0, worst
