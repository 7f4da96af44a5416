"""MindSpore `.ckpt` files (what MindFormers saves with `checkpoint_format: ckpt`) read like safetensors shards.

MindFormers' CheckpointMonitor writes `<output_dir>/checkpoint/rank_<r>/<prefix>_rank_<r>-<epoch>_<step>.ckpt`,
one protobuf file per rank and save, holding the weights under MindFormers' names next to its optimizer state
(`adam_m.*`, `adam_v.*`, `global_step`, ...). `MindSporeCheckpointFile` gives such a file the reader interface of
`safetensors_io.SafetensorsFile` (keys, info, get_raw, get), so the HF loader and the converter read it through
the same MindFormers weight layout as MindFormers' safetensors. The protobuf format cannot be memory-mapped:
MindSpore parses the whole file into memory once (`mindspore.load_checkpoint`), which bounds the size that loads
to what fits in host memory.

A location resolves to one file (`resolve_ckpt_file`): a `.ckpt` path itself; a directory's newest `.ckpt` by
the (epoch, step) in its name; or, for MindFormers' `checkpoint/` folder, the same inside its single `rank_0/`.
Several `rank_<r>/` folders are the shards of a distributed run (each rank's slice of split tensors), which this
reader does not merge: the error says how to get whole tensors.
"""
import os
import re

import numpy as np

CKPT_SUFFIX = ".ckpt"
_RANK_DIR = re.compile(r"^rank_(\d+)$")
_EPOCH_STEP = re.compile(r"-(\d+)_(\d+)\.ckpt$")

# MindSpore dtype (str of a Tensor's dtype) -> (safetensors dtype name, NumPy dtype of the stored bits)
_DTYPES = {
    "Float64": ("F64", np.float64), "Float32": ("F32", np.float32), "Float16": ("F16", np.float16),
    "BFloat16": ("BF16", np.uint16), "Int64": ("I64", np.int64), "Int32": ("I32", np.int32),
    "Int16": ("I16", np.int16), "Int8": ("I8", np.int8), "UInt64": ("U64", np.uint64),
    "UInt32": ("U32", np.uint32), "UInt16": ("U16", np.uint16), "UInt8": ("U8", np.uint8),
    "Bool": ("BOOL", np.bool_),
}


def _checkpoint_error(message):
    from mindpretrain.checkpoint.safetensors_io import SafetensorsError

    return SafetensorsError(message)


def _newest(directory, names):
    """The file of the highest (epoch, step) in its MindFormers name; modification time breaks ties."""
    def order(name):
        match = _EPOCH_STEP.search(name)
        numbers = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
        return numbers, os.path.getmtime(os.path.join(directory, name))
    return os.path.join(directory, max(names, key=order))


def resolve_ckpt_file(location):
    """The `.ckpt` file that `location` means, or None when it holds none (see the module docstring)."""
    location = str(location)
    if os.path.isfile(location):
        return location if location.endswith(CKPT_SUFFIX) else None
    if not os.path.isdir(location):
        return None
    names = [name for name in os.listdir(location) if name.endswith(CKPT_SUFFIX)
             and os.path.isfile(os.path.join(location, name))]
    if names:
        return _newest(location, names)
    ranks = sorted(name for name in os.listdir(location)
                   if _RANK_DIR.match(name) and os.path.isdir(os.path.join(location, name)))
    if not ranks:
        return None
    if len(ranks) > 1:
        raise _checkpoint_error(
            f"{location} holds the per-rank checkpoints of a distributed run ({', '.join(ranks)}): their tensors "
            "are each rank's slices, which are not merged here; save with CheckpointMonitor integrated_save: True "
            "from a run without model parallelism, or merge them with MindSpore's checkpoint transformation "
            "(mindspore.transform_checkpoints / unified_safetensors) first")
    return resolve_ckpt_file(os.path.join(location, ranks[0]))


class MindSporeCheckpointFile:
    """A `.ckpt` file with the reader interface of `SafetensorsFile` (parsed whole, once, at opening)."""

    def __init__(self, path):
        import mindspore as ms

        self.path = str(path)
        self.metadata = {}
        try:
            parameters = ms.load_checkpoint(self.path)
        except (RuntimeError, ValueError, OSError) as error:
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise _checkpoint_error(f"cannot read MindSpore checkpoint {self.path}: {first}") from None
        self._arrays = {}
        for name, parameter in parameters.items():
            dtype = str(parameter.dtype)
            if dtype not in _DTYPES:
                raise _checkpoint_error(f"{self.path}: tensor {name!r} has dtype {dtype}, which this reader does not "
                                        f"know (known: {', '.join(sorted(_DTYPES))})")
            stored_name, bits = _DTYPES[dtype]
            array = parameter.asnumpy()
            self._arrays[name] = (stored_name, np.ascontiguousarray(array).view(bits).reshape(array.shape))

    def keys(self):
        return list(self._arrays)

    def __contains__(self, name):
        return name in self._arrays

    def _entry(self, name):
        try:
            return self._arrays[name]
        except KeyError:
            raise _checkpoint_error(f"{self.path} has no tensor named {name!r}") from None

    def info(self, name):
        """(stored dtype name in safetensors terms, shape)."""
        stored_name, bits = self._entry(name)
        return stored_name, tuple(bits.shape)

    def nbytes(self, name):
        return self._entry(name)[1].nbytes

    def get_raw(self, name):
        """The stored bits (bf16 as uint16), read-only."""
        bits = self._entry(name)[1].view()
        bits.flags.writeable = False
        return bits

    def get(self, name):
        """A writable array: bf16 as float32, other dtypes as stored."""
        from mindpretrain.checkpoint.safetensors_io import decode

        stored_name, bits = self._entry(name)
        return decode(stored_name, bits)

    def close(self):
        self._arrays = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
