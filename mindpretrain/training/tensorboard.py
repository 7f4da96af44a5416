"""TensorBoard scalar event files without TensorFlow, tensorboardX or MindInsight.

An event file is a sequence of records `len(u64) crc(len) Event-protobuf crc(data)` with masked
CRC-32C checksums; the Event message needs only five fields for scalars, encoded here by hand
(protobuf wire format), so the trainer gains TensorBoard curves without a new dependency.
Files are named `events.out.tfevents.<time>.<host>` as TensorBoard expects.
"""
import os
import socket
import struct
import time

_CRC32C_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1
    _CRC32C_TABLE.append(_crc)


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value):
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number, wire_type, payload):
    key = _varint((number << 3) | wire_type)
    if wire_type == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def encode_event(wall_time, step=None, scalars=None, file_version=None):
    """Event{wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5 {value=1 {tag=1, simple_value=2}}}."""
    message = _field(1, 1, struct.pack("<d", wall_time))
    if step is not None:
        message += _field(2, 0, _varint(int(step)))
    if file_version is not None:
        message += _field(3, 2, file_version.encode())
    if scalars:
        summary = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(value))))
                           for tag, value in scalars.items())
        message += _field(5, 2, summary)
    return message


def frame_record(data):
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class ScalarWriter:
    """`writer.add_scalars({"loss": 2.3}, step)`; flushed after every call so a crash loses nothing."""

    def __init__(self, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._handle = open(self.path, "ab")
        self._write(encode_event(time.time(), file_version="brain.Event:2"))

    def _write(self, event):
        self._handle.write(frame_record(event))
        self._handle.flush()

    def add_scalars(self, scalars, step):
        self._write(encode_event(time.time(), step=step, scalars=scalars))

    def close(self):
        self._handle.close()


def read_scalars(path):
    """[(step, {tag: value})] of an event file written by ScalarWriter (checks every CRC)."""
    events = []
    with open(path, "rb") as handle:
        data = handle.read()
    offset = 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[offset + 8:offset + 12])[0] != masked_crc32c(header):
            raise ValueError(f"{path}: bad length checksum at byte {offset}")
        payload = data[offset + 12:offset + 12 + length]
        if struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] != masked_crc32c(payload):
            raise ValueError(f"{path}: bad data checksum at byte {offset}")
        offset += 16 + length
        step, scalars = _decode_event(payload)
        if scalars:
            events.append((step, scalars))
    return events


def _read_varint(data, offset):
    value, shift = 0, 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def _fields(data):
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, offset = _read_varint(data, offset)
        elif wire_type == 1:
            value, offset = data[offset:offset + 8], offset + 8
        elif wire_type == 5:
            value, offset = data[offset:offset + 4], offset + 4
        else:
            length, offset = _read_varint(data, offset)
            value, offset = data[offset:offset + length], offset + length
        yield number, value


def _decode_event(payload):
    step, scalars = 0, {}
    for number, value in _fields(payload):
        if number == 2:
            step = value
        elif number == 5:
            for _, entry in _fields(value):
                tag, scalar = None, None
                for sub_number, sub_value in _fields(entry):
                    if sub_number == 1:
                        tag = sub_value.decode()
                    elif sub_number == 2:
                        scalar = struct.unpack("<f", sub_value)[0]
                scalars[tag] = scalar
    return step, scalars
