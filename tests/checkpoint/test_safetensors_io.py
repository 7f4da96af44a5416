"""safetensors I/O against the reference `safetensors` package (and torch for bf16/fp8 values)."""
import json
import os
import struct

import numpy as np
import pytest

from conftest import require_reference
from mindpretrain.checkpoint.safetensors_io import (
    SafetensorsError, SafetensorsWriter, bf16_bits_to_float32, e4m3_bits_to_float32, float32_to_bf16_bits,
    load_safetensors, open_safetensors, read_checkpoint_dir, save_safetensors)


def test_our_file_reads_with_the_reference_package(tmp_path):
    safetensors_numpy = require_reference("safetensors.numpy")
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2, 3], dtype=np.int64),
               "c": np.ones((2, 0), dtype=np.float16)}
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors, metadata={"format": "np"})
    loaded = safetensors_numpy.load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == value.dtype


def test_reference_file_reads_with_ours(tmp_path):
    safetensors_numpy = require_reference("safetensors.numpy")
    tensors = {"w": np.random.RandomState(0).randn(5, 7).astype(np.float32), "i": np.arange(4, dtype=np.int32)}
    path = tmp_path / "ref.safetensors"
    safetensors_numpy.save_file(tensors, str(path), metadata={"k": "v"})
    with open_safetensors(path) as handle:
        assert handle.metadata == {"k": "v"}
        assert handle.info("w") == ("F32", (5, 7))
        np.testing.assert_array_equal(handle.get("w"), tensors["w"])
        np.testing.assert_array_equal(handle.get("i"), tensors["i"])


def test_bf16_and_fp8_values_equal_torch(tmp_path):
    torch = require_reference("torch")
    safetensors_torch = require_reference("safetensors.torch")
    values = torch.randn(64, 33, generator=torch.Generator().manual_seed(1)) * 10
    values[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 3.0e38])
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file({"bf": values.to(torch.bfloat16), "f8": (values / 100).to(torch.float8_e4m3fn)},
                                str(path))
    with open_safetensors(path) as handle:
        bf = handle.get("bf")
        expected = values.to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(bf, expected)  # NaN positions compare equal in assert_array_equal
        f8 = handle.get("f8")
        np.testing.assert_array_equal(f8, (values / 100).to(torch.float8_e4m3fn).float().numpy())
    # Our float32 -> bf16 rounding equals torch's (round to nearest even).
    np.testing.assert_array_equal(bf16_bits_to_float32(float32_to_bf16_bits(values.numpy())), expected)


def test_e4m3_table_covers_the_format():
    bits = np.arange(256, dtype=np.uint8)
    values = e4m3_bits_to_float32(bits)
    assert np.isnan(values[0x7F]) and np.isnan(values[0xFF]) and np.isnan(values).sum() == 2
    assert values[0x7E] == 448.0 and values[0x01] == 2.0 ** -9 and values[0x38] == 1.0


def test_bf16_written_file_roundtrips_and_streams(tmp_path):
    path = tmp_path / "s.safetensors"
    values = np.linspace(-3, 3, 50, dtype=np.float32).reshape(5, 10)
    with SafetensorsWriter(path, {"step": 3}) as writer:
        writer.add("x", values, "BF16")
        writer.add("y", values)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    loaded = load_safetensors(path)
    np.testing.assert_array_equal(loaded["x"], bf16_bits_to_float32(float32_to_bf16_bits(values)))
    np.testing.assert_array_equal(loaded["y"], values)


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "f.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path) as writer:
            writer.add("x", np.zeros(3, np.float32))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_truncated_and_corrupt_files_are_named(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"x": np.zeros((100,), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(SafetensorsError, match=r"t\.safetensors is truncated: tensor 'x'"):
        open_safetensors(path)
    path.write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    with pytest.raises(SafetensorsError, match="truncated or not a safetensors file"):
        open_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(SafetensorsError, match="corrupt header"):
        open_safetensors(path)
    with pytest.raises(SafetensorsError, match="cannot open"):
        open_safetensors(tmp_path / "missing.safetensors")


def test_checkpoint_dir_with_and_without_index(tmp_path):
    save_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32)})
    save_safetensors(tmp_path / "b.safetensors", {"y": np.zeros(1, np.float32)})
    located = read_checkpoint_dir(tmp_path)
    assert located == {"x": str(tmp_path / "a.safetensors"), "y": str(tmp_path / "b.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "c.safetensors"}}))
    with pytest.raises(SafetensorsError, match="missing: c.safetensors"):
        read_checkpoint_dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    save_safetensors(tmp_path / "c.safetensors", {"y": np.zeros(1, np.float32)})
    with pytest.raises(SafetensorsError, match="stored twice"):
        read_checkpoint_dir(tmp_path)


def test_scalars_keep_their_shape(tmp_path):
    path = tmp_path / "scalar.safetensors"
    save_safetensors(path, {"step": np.array(7, dtype=np.int64), "lr": (np.array(0.5, dtype=np.float32), "BF16")})
    with open_safetensors(path) as handle:
        assert handle.info("step") == ("I64", ()) and handle.info("lr") == ("BF16", ())
        assert handle.get("step") == 7 and handle.get("lr").shape == ()
