"""fp8 (e4m3fn) weights with 128x128 block scales, as in DeepSeek-V3's released checkpoint.

The release stores most 2-D linear weights as float8 e4m3fn codes `W_q` [M, N] plus a float32 tensor
`<name>_scale_inv` [ceil(M/128), ceil(N/128)]. Edge blocks are ragged (smaller than 128) when M or N is not
a multiple of 128; each block has its own scale.

Dequantisation follows DeepSeek's `inference/kernel.py::weight_dequant` (used by `fp8_cast_bf16.py`) exactly:
each code is widened to float32 (exact: e4m3 values are float32 values), multiplied by its block's float32
scale **in float32** (one IEEE multiply, round-to-nearest-even), and the float32 product is then cast to the
output dtype. The official tool casts to bf16 (float32 -> bf16, nearest-even); `--dtype fp32` keeps the float32
product, which is the most precise value any of the official paths ever computes.

Quantisation (for deployment) follows `weight_quant` of the same file: per block `s = amax(|x|) / 448` in float32,
codes = e4m3fn(x / s) rounded to nearest (ties to even), `scale_inv = s` stored as float32. Two deliberate
deviations for degenerate blocks, where the official kernel produces NaN: an all-zero block gets codes 0 and
scale_inv 1.0; non-finite input is refused. Values that land a rounding step above 448 saturate to 448.
Divisions are IEEE float32 (as torch on CPU computes them, bit for bit; a GPU Triton kernel using approximate
division could differ by one code in rare cases).

Everything here is NumPy on row slabs of 128 rows, so a huge tensor is processed without a second full-size
float32 temporary.
"""
import numpy as np

from mindpretrain.checkpoint.safetensors_io import E4M3_VALUES, float32_to_bf16_bits

BLOCK = 128
E4M3_MAX = 448.0

# Names the release keeps in bf16 although they are 2-D (or never 2-D): the same list as DeepSeek's
# `bf16_cast_fp8.py` SKIP_QUANT_PATTERNS and the released `model.safetensors.index.json`.
_NOT_QUANTISED_SUFFIXES = (
    "layernorm.weight", "norm.weight", "embed_tokens.weight", "head.weight", "lm_head.weight",
    "eh_proj.weight", "mlp.gate.weight", "e_score_correction_bias",
)
SCALE_SUFFIX = "_scale_inv"


def quantised_in_release(name, ndim):
    """True for tensors the official release stores as fp8 + `<name>_scale_inv`: every 2-D linear weight of the
    decoder blocks (attention projections, dense MLP, experts, shared experts) and nothing else."""
    return ndim == 2 and name.endswith(".weight") and not name.endswith(_NOT_QUANTISED_SUFFIXES)


def scale_shape(shape, block=BLOCK):
    rows, cols = shape
    return (-(-rows // block), -(-cols // block))


def check_scale_shape(name, weight_shape, scale_shape_found, block=BLOCK):
    """A message if `scale_inv` does not have one entry per (ragged) block of the weight, else None."""
    if len(weight_shape) != 2:
        return f"{name}: fp8 weight must be 2-D, found shape {list(weight_shape)}"
    expected = scale_shape(weight_shape, block)
    if tuple(scale_shape_found) != expected:
        return (f"{name}{SCALE_SUFFIX}: shape {list(scale_shape_found)} does not match the {block}x{block} blocks of "
                f"weight {list(weight_shape)} (expected {list(expected)})")
    return None


def e4m3_to_float32(codes):
    """Decode e4m3fn codes (uint8) through a 256-entry table."""
    return E4M3_VALUES[np.asarray(codes, dtype=np.uint8)]


def float32_to_e4m3(values):
    """Round float32 to the nearest e4m3fn code (ties to the even code), saturating at +-448; NaN is refused.

    Bit arithmetic on the float32 pattern, no table search: for normal e4m3 magnitudes (>= 2**-6) the 23-bit
    mantissa is rounded to 3 bits with the usual round-to-nearest-even carry trick (a carry into the exponent is
    the correct result) and the exponent is re-biased (127 -> 7); below 2**-6 the e4m3 values are the multiples
    of 2**-9, so the code is rint(|x| * 512) (numpy's rint rounds ties to even). Matches torch's cast bit for bit.
    """
    values = np.asarray(values, dtype=np.float32)
    if np.isnan(values).any():
        raise ValueError("cannot encode NaN as an e4m3fn weight code")
    magnitude = np.minimum(np.abs(values), np.float32(E4M3_MAX))
    bits = magnitude.view(np.uint32)
    rounded = bits + np.uint32(0x7FFFF) + ((bits >> np.uint32(20)) & np.uint32(1))
    normal = (rounded >> np.uint32(20)) - np.uint32(120 << 3)          # exponent bias 127 -> 7, 3 mantissa bits
    subnormal = np.rint(magnitude * np.float32(512.0)).astype(np.uint32)
    codes = np.where(magnitude < np.float32(2.0 ** -6), subnormal, normal).astype(np.uint8)
    codes |= np.signbit(values).astype(np.uint8) << np.uint8(7)
    return codes


def dequantise_rows(codes, scale_inv, row_start=0, block=BLOCK):
    """float32 [r, N] for a slab of fp8 codes starting at `row_start` (a multiple of `block`).

    Each element is float32(code) * float32(scale of its block), computed in float32.
    """
    codes = np.asarray(codes)
    if row_start % block:
        raise ValueError(f"row_start ({row_start}) must be a multiple of the block size {block}")
    rows, cols = codes.shape
    scale_inv = np.asarray(scale_inv, dtype=np.float32)
    out = e4m3_to_float32(codes)
    for offset in range(0, rows, block):
        row_scale = np.repeat(scale_inv[(row_start + offset) // block], block)[:cols]
        out[offset:offset + block] *= row_scale
    return out


def dequantise(codes, scale_inv, out_dtype="float32", block=BLOCK):
    """Dequantise a whole fp8 weight; `out_dtype` "float32" (the float32 product) or "bfloat16" (uint16 bits,
    the product rounded to nearest-even, as the official `fp8_cast_bf16.py` writes it)."""
    codes = np.asarray(codes)
    problem = check_scale_shape("weight", codes.shape, np.shape(scale_inv), block)
    if problem:
        raise ValueError(problem)
    product = dequantise_rows(codes, scale_inv, 0, block)
    if out_dtype == "float32":
        return product
    if out_dtype == "bfloat16":
        return float32_to_bf16_bits(product)
    raise ValueError(f"out_dtype ({out_dtype!r}) must be 'float32' or 'bfloat16'")


def quantise_rows(values, block=BLOCK):
    """Quantise a slab of whole block rows: float32 [r <= block, N] -> (uint8 codes [r, N], float32 scales [ceil(N/b)])."""
    values = np.asarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError("weight holds NaN or infinity; refusing to quantise it to fp8")
    rows, cols = values.shape
    col_blocks = -(-cols // block)
    padded = np.zeros((rows, col_blocks * block), dtype=np.float32)
    padded[:, :cols] = np.abs(values)
    amax = padded.reshape(rows, col_blocks, block).max(axis=(0, 2))
    scales = (amax / np.float32(E4M3_MAX)).astype(np.float32)
    scales[amax == 0] = np.float32(1.0)
    divided = values / np.repeat(scales, block)[:cols]          # float32 / float32: one rounding, as torch does
    return float32_to_e4m3(divided), scales


def quantise(values, block=BLOCK):
    """Block-quantise a 2-D float32 weight -> (uint8 e4m3fn codes [M, N], float32 scale_inv [ceil(M/b), ceil(N/b)])."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"fp8 block quantisation takes 2-D weights, got shape {list(values.shape)}")
    rows, cols = values.shape
    codes = np.empty((rows, cols), dtype=np.uint8)
    scales = np.empty(scale_shape(values.shape, block), dtype=np.float32)
    for i, start in enumerate(range(0, rows, block)):
        codes[start:start + block], scales[i] = quantise_rows(values[start:start + block], block)
    return codes, scales
