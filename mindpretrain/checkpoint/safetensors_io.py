"""Read and write safetensors files with NumPy only, memory-mapped, one tensor at a time.

Why not the `safetensors` package: its NumPy API cannot hold bfloat16 or float8 (NumPy has
neither), and DeepSeek-V3's released weights are fp8 with bf16 neighbours. Reading here returns
the stored bits (`get_raw`) or float32 values (`get`), straight from a memory map, so a converter
touches one tensor at a time and peak memory stays near the largest tensor, not the shard.
Writing streams tensor by tensor into a temporary file that is renamed only when complete.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`
(offsets relative to the end of the header), then the raw little-endian tensor bytes.
"""
import json
import mmap
import os
import struct

import numpy as np

from mindpretrain.utils.atomic_files import commit, discard, temporary_sibling
from mindpretrain.utils.open_once import OpenOnce

# Stored dtype name -> NumPy dtype of the stored bits.
_STORAGE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
# NumPy dtype -> stored dtype name, for arrays written as they are.
_NATIVE_NAME = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound; a larger "length" means a corrupt file
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read or written as asked; the message names the file."""


def float32_to_bf16_bits(values):
    """Round float32 to bfloat16 (nearest, ties to even, NaN kept NaN) and return the uint16 bits."""
    values = np.asarray(values, dtype=np.float32)
    shape = values.shape
    values = np.ascontiguousarray(values).reshape(-1)
    bits = values.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # keep it a quiet NaN
    return rounded.reshape(shape)


def bf16_bits_to_float32(bits):
    """Exact widening of bfloat16 bits (uint16) to float32."""
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.reshape(-1).astype(np.uint32) << 16).view(np.float32).reshape(bits.shape)


def _e4m3fn_table():
    """All 256 float8 e4m3fn values (OCP FP8: bias 7, no infinities, S.1111.111 is NaN)."""
    table = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            table[code] = np.nan
        elif exponent == 0:
            table[code] = sign * (mantissa / 8.0) * 2.0 ** -6
        else:
            table[code] = sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)
    return table


def _e5m2_table():
    """All 256 float8 e5m2 values: the upper byte of an IEEE float16."""
    return (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)


E4M3_VALUES = _e4m3fn_table()
E5M2_VALUES = _e5m2_table()


def e4m3_bits_to_float32(bits):
    return E4M3_VALUES[np.asarray(bits, dtype=np.uint8)]


def decode(dtype_name, raw):
    """Stored bits -> a NumPy array: bf16/fp8 widened to float32, everything else as stored."""
    if dtype_name == "BF16":
        return bf16_bits_to_float32(raw)
    if dtype_name == "F8_E4M3":
        return e4m3_bits_to_float32(raw)
    if dtype_name == "F8_E5M2":
        return E5M2_VALUES[raw]
    return np.array(raw)


def encode(array, dtype_name=None):
    """(stored dtype name, stored bits) for `array`; `dtype_name` converts floats (F32/F16/BF16)."""
    array = np.asarray(array)
    name, bits = _encode_bits(array, dtype_name)
    return name, bits.reshape(array.shape)  # np.ascontiguousarray makes 0-d arrays 1-d


def _encode_bits(array, dtype_name):
    if dtype_name is None:
        if array.dtype not in _NATIVE_NAME:
            raise SafetensorsError(f"NumPy dtype {array.dtype} has no safetensors name; pass dtype=")
        return _NATIVE_NAME[array.dtype], np.ascontiguousarray(array)
    if dtype_name == "BF16":
        if array.dtype == np.uint16:  # already bf16 bits
            return "BF16", np.ascontiguousarray(array)
        return "BF16", float32_to_bf16_bits(array)
    if dtype_name in ("F8_E4M3", "F8_E5M2"):
        if array.dtype != np.uint8:
            raise SafetensorsError(f"{dtype_name} tensors are written from their uint8 bits, got {array.dtype}")
        return dtype_name, np.ascontiguousarray(array)
    if dtype_name not in _STORAGE:
        raise SafetensorsError(f"unknown safetensors dtype {dtype_name!r} (known: {', '.join(sorted(_STORAGE))})")
    return dtype_name, np.ascontiguousarray(array, dtype=_STORAGE[dtype_name])


class SafetensorsFile:
    """Memory-mapped reader. Tensors are read lazily; nothing is loaded until asked for."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self._handle = open(self.path, "rb")
        except OSError as error:
            raise SafetensorsError(f"cannot open safetensors file {self.path}: {error.strerror}") from None
        try:
            self._parse()
        except BaseException:
            self._handle.close()
            raise

    def _parse(self):
        size = os.fstat(self._handle.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{self.path} is not a safetensors file: {size} bytes, shorter than its header")
        (header_length,) = struct.unpack("<Q", self._handle.read(8))
        if header_length > min(_HEADER_LIMIT, size - 8):
            raise SafetensorsError(f"{self.path} is truncated or not a safetensors file: header of "
                                   f"{header_length} bytes in a file of {size} bytes")
        try:
            header = json.loads(self._handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsError(f"{self.path} has a corrupt header: {error}") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path} has a corrupt header: not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_length
        data_size = size - self._data_start
        self._entries = {}
        for name, entry in header.items():
            try:
                dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: header entry for {name!r} is malformed: {entry!r}") from None
            if dtype_name not in _STORAGE:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {dtype_name!r}, which this reader "
                                       f"does not know (known: {', '.join(sorted(_STORAGE))})")
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_STORAGE[dtype_name]).itemsize
            if end - begin != expected or begin < 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r} spans {end - begin} bytes but "
                                       f"{dtype_name}{list(shape)} needs {expected}")
            if end > data_size:
                raise SafetensorsError(f"{self.path} is truncated: tensor {name!r} ends at byte {end} of the data "
                                       f"section, which holds only {data_size} bytes")
            self._entries[name] = (dtype_name, shape, begin, end)
        self._map = (mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None)

    def keys(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def info(self, name):
        """(stored dtype name, shape) without reading the data."""
        dtype_name, shape, _, _ = self._entry(name)
        return dtype_name, shape

    def nbytes(self, name):
        _, _, begin, end = self._entry(name)
        return end - begin

    def get_raw(self, name):
        """The stored bits as a read-only array view of the file (no copy)."""
        dtype_name, shape, begin, end = self._entry(name)
        return np.frombuffer(self._map, dtype=_STORAGE[dtype_name], count=(end - begin) // np.dtype(
            _STORAGE[dtype_name]).itemsize, offset=self._data_start + begin).reshape(shape)

    def get(self, name):
        """A writable in-memory array: bf16/fp8 as float32, other dtypes as stored."""
        dtype_name, _, _, _ = self._entry(name)
        return decode(dtype_name, self.get_raw(name))

    def _entry(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise SafetensorsError(f"{self.path} has no tensor named {name!r}") from None

    def close(self):
        if getattr(self, "_map", None) is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view handed out is still alive; the map closes when it is collected
            self._map = None
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_safetensors(path):
    return SafetensorsFile(path)


def open_tensor_file(path):
    """A reader for one weights file: safetensors, or a MindSpore `.ckpt` (same interface, parsed whole)."""
    from mindpretrain.checkpoint.mindspore_ckpt import CKPT_SUFFIX, MindSporeCheckpointFile

    return MindSporeCheckpointFile(path) if str(path).endswith(CKPT_SUFFIX) else SafetensorsFile(path)


def weight_files(location):
    """The weights files of a checkpoint location: its `*.safetensors` files (sorted), else the one MindSpore
    `.ckpt` file it means (`mindspore_ckpt.resolve_ckpt_file`: the file itself, a directory's newest, or the one
    in MindFormers' `rank_0/`); [] when there is neither."""
    from mindpretrain.checkpoint.mindspore_ckpt import resolve_ckpt_file

    location = str(location)
    if os.path.isdir(location):
        files = sorted(name for name in os.listdir(location) if name.endswith(".safetensors"))
        if files:
            return [os.path.join(location, name) for name in files]
    ckpt = resolve_ckpt_file(location)
    return [ckpt] if ckpt else []


def encode_header(entries, metadata=None):
    """The length-prefixed JSON header for `entries` ({name: {dtype, shape, data_offsets}}), padded so that
    tensor data starts 8-byte aligned, as the reference implementation writes it."""
    header = dict(entries)
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


class SafetensorsWriter:
    """Streams tensors into `path`: data goes to a temporary file as added, header on `close()`.

    The header must precede the data but is only known at the end, so tensors are appended to a
    scratch file and copied behind the header at close; the final name appears only when complete.
    """

    def __init__(self, path, metadata=None):
        self.path = str(path)
        self.metadata = metadata
        self._entries = {}
        self._offset = 0
        self._scratch_path = temporary_sibling(self.path)
        self._scratch = open(self._scratch_path, "wb")
        self._closed = False

    def add(self, name, array, dtype=None):
        if name in self._entries:
            raise SafetensorsError(f"{self.path}: tensor {name!r} added twice")
        dtype_name, bits = encode(array, dtype)
        data = bits.tobytes()
        self._scratch.write(data)
        self._entries[name] = {"dtype": dtype_name, "shape": list(bits.shape),
                               "data_offsets": [self._offset, self._offset + len(data)]}
        self._offset += len(data)

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._scratch.close()
        final_tmp = temporary_sibling(self.path)
        try:
            with open(final_tmp, "wb") as out, open(self._scratch_path, "rb") as scratch:
                out.write(encode_header(self._entries, self.metadata))
                while True:
                    chunk = scratch.read(64 * 1024 * 1024)
                    if not chunk:
                        break
                    out.write(chunk)
            commit(final_tmp, self.path)
        except BaseException:
            discard(final_tmp)
            raise
        finally:
            discard(self._scratch_path)

    def abort(self):
        """Drop everything written so far; the final path is never created."""
        if not self._closed:
            self._closed = True
            self._scratch.close()
            discard(self._scratch_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_safetensors(path, tensors, metadata=None):
    """Write `{name: array or (array, dtype_name)}` to `path` atomically."""
    with SafetensorsWriter(path, metadata) as writer:
        for name, value in tensors.items():
            array, dtype_name = value if isinstance(value, tuple) else (value, None)
            writer.add(name, array, dtype_name)


def load_safetensors(path):
    """Every tensor of a (small) file as in-memory arrays; bf16/fp8 as float32."""
    with open_safetensors(path) as handle:
        return {name: handle.get(name) for name in handle.keys()}


def read_index(directory):
    """The `weight_map` of a directory's model.safetensors.index.json, or None when it has no index."""
    index_path = os.path.join(str(directory), INDEX_FILE)
    if not os.path.isfile(index_path):
        return None
    try:
        with open(index_path, "r", encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SafetensorsError(f"{index_path} is not a valid safetensors index: {error}") from None
    return weight_map


class OpenFiles(OpenOnce):
    """Opens each weights file (safetensors or `.ckpt`) once, on first use, and closes them together (see
    `OpenOnce`)."""

    def __init__(self):
        super().__init__(open_tensor_file)


def read_checkpoint_dir(directory):
    """Map each tensor name of a checkpoint directory to the file holding it.

    Uses `model.safetensors.index.json` when present (and checks that every file it names
    exists); otherwise every `*.safetensors` file in the directory, or else the MindSpore `.ckpt` file
    it holds (`weight_files`; `directory` may also be that file). A name in two files is an error.
    """
    directory = str(directory)
    if os.path.isfile(directory) and weight_files(directory):
        return _locate(weight_files(directory))
    if not os.path.isdir(directory):
        raise SafetensorsError(f"checkpoint directory {directory} does not exist")
    weight_map = read_index(directory)
    if weight_map is not None:
        missing = sorted({name for name in weight_map.values()
                          if not os.path.isfile(os.path.join(directory, name))})
        if missing:
            raise SafetensorsError(f"{os.path.join(directory, INDEX_FILE)} names shard files that are missing: {', '.join(missing)}")
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    files = weight_files(directory)
    if not files:
        raise SafetensorsError(f"{directory} holds no *.safetensors file, no {INDEX_FILE} and no MindSpore .ckpt file")
    return _locate(files)


def _locate(paths):
    """{tensor name: file} over `paths`; a name in two files is an error."""
    located = {}
    for path in paths:
        with open_tensor_file(path) as handle:
            for name in handle.keys():
                if name in located:
                    raise SafetensorsError(f"tensor {name!r} is stored twice: in {located[name]} and {path}")
                located[name] = path
    return located
