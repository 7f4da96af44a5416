"""Rotary position embedding of DeepSeek-V3: plain RoPE or YaRN, on the `qk_rope_head_dim` slice only.

YaRN (arXiv 2309.00071) as DeepSeek-V3 uses it:
* frequencies: dimensions rotating fewer than `beta_slow` times over the original context are interpolated
  (divided by `factor`), those rotating more than `beta_fast` times are kept, a linear ramp blends in between;
* cos/sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim);
* the softmax scale 1/sqrt(qk_head_dim) is multiplied by mscale(factor, mscale_all_dim)^2 (when
  mscale_all_dim is set), so that attention entropy stays where pretraining left it.
with mscale(s, m) = 0.1 * m * ln(s) + 1 for s > 1, else 1. The tables are built once in float64 NumPy and
stored as float32, so every step only slices them.

Layout: the released weights store the rotary dimensions as interleaved pairs (x0, x1), (x2, x3), ...
(`rope_interleave: true`, the default); `rope_interleave: false` rotates the halves (x_i, x_{i+R/2}). Either way
the output lists the rotated first members then the second members; q and k use the same layout, so their
dot product is the RoPE dot product.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from research.deepseek3.layers import expand_to, split_last


def yarn_mscale(scale, mscale=1.0):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(model_config):
    """-> (inv_freq float64 [R/2], cos/sin multiplier) for model_config.rope_theta / model_config.rope_scaling."""
    dim, base = model_config.qk_rope_head_dim, float(model_config.rope_theta)
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv_freq = 1.0 / base ** exponents
    scaling = model_config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(scaling["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(scaling["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp                       # 1: keep the original frequency (extrapolate), 0: interpolate
    inv_freq = inv_freq / factor * (1.0 - keep) + inv_freq * keep
    multiplier = yarn_mscale(factor, scaling["mscale"]) / yarn_mscale(factor, scaling["mscale_all_dim"])
    return inv_freq, multiplier


def softmax_scale(model_config):
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = model_config.qk_head_dim ** -0.5
    scaling = model_config.rope_scaling
    if scaling is not None and scaling["mscale_all_dim"]:
        scale *= yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"]) ** 2
    return scale


def rope_tables(model_config, length):
    """cos, sin float32 [length, R/2] (multiplier included)."""
    inv_freq, multiplier = inverse_frequencies(model_config)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return (np.cos(angles) * multiplier).astype(np.float32), (np.sin(angles) * multiplier).astype(np.float32)


class RotaryEmbedding(nn.Cell):
    """Holds the tables for `length` positions. `construct(seq)` -> (cos, sin) [seq, R/2] float32, the same for
    every row; `construct(seq, position_ids)` with int [B, seq] ids -> (cos, sin) [B, 1, seq, R/2], each row's
    own positions (packed rows restart at 0 per document), shaped to broadcast over the heads of [B, N, seq, R].
    The ids must be < `length` (a packed document is never longer than seq_length, so they are)."""

    def __init__(self, model_config, length):
        super().__init__()
        cos, sin = rope_tables(model_config, length)
        self.length = length
        self.cos = Tensor(cos)
        self.sin = Tensor(sin)

    def construct(self, seq_length, position_ids=None):
        if seq_length > self.length:
            raise ValueError(f"sequence length {seq_length} exceeds the RoPE table ({self.length} positions, "
                             f"model_config.seq_length)")
        if position_ids is None:
            return self.cos[:seq_length], self.sin[:seq_length]
        ids = ops.cast(position_ids, ms.int32)
        return ops.expand_dims(ops.gather(self.cos, ids, 0), 1), ops.expand_dims(ops.gather(self.sin, ids, 0), 1)


def apply_rotary(x, cos, sin, interleave, explicit_broadcast=False):
    """x [..., S, R] with cos/sin [S, R/2] (or [B, 1, S, R/2] for x [B, N, S, R]) -> rotated x [..., S, R]
    (first members, then second members). `explicit_broadcast` expands cos/sin to x's halves first (the CPU
    backend's implicitly broadcasting Mul holds extra full-size buffers: layers.broadcasts_explicitly)."""
    half = x.shape[-1] // 2
    if interleave and explicit_broadcast:       # compiled CPU graphs: Split's Slice kernels, not StridedSlice
        first, second = ops.split(x.reshape(x.shape[:-1] + (half, 2)), 1, -1)
        first, second = first.reshape(x.shape[:-1] + (half,)), second.reshape(x.shape[:-1] + (half,))
    elif interleave:
        pairs = x.reshape(x.shape[:-1] + (half, 2))
        first, second = pairs[..., 0], pairs[..., 1]
    else:
        first, second = split_last(x, half, half, explicit_broadcast)
    cos = expand_to(ops.cast(cos, x.dtype), first.shape, explicit_broadcast)
    sin = expand_to(ops.cast(sin, x.dtype), first.shape, explicit_broadcast)
    return ops.concat((first * cos - second * sin, second * cos + first * sin), -1)
