"""Convert a HuggingFace DeepSeek-V3 checkpoint (official fp8 release, or bf16/fp32) into native weights.

    python tools/convert_hf_to_native.py --hf-dir /models/DeepSeek-V3 --output-dir /ckpt/deepseek3-native \\
        [--dtype bf16|fp32] [--workers 4] [--max-shard-size 5GB]

Streams shard by shard from memory-mapped files (peak memory about one source shard per worker, never the
model), dequantises fp8 weights with their 128x128 `weight_scale_inv` blocks, keeps the MTP layers, checks every
tensor against the model's name/shape table before writing, and writes into a temporary directory renamed to
--output-dir only when complete and verified. The result is what `run_mindformer.py --load_checkpoint` takes.
"""
import argparse
import sys

from mindpretrain.checkpoint.conversion import DEFAULT_MAX_SHARD, ConversionError, convert_hf_to_native
from mindpretrain.checkpoint.safetensors_io import SafetensorsError
from mindpretrain.config import ConfigError


def build_parser():
    parser = argparse.ArgumentParser(prog="convert_hf_to_native.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF directory: config.json + *.safetensors (+ index)")
    parser.add_argument("--output-dir", required=True, help="new directory for the native weights (must not exist "
                                                            "or be empty)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="stored dtype of the weights (default bf16; the expert-score bias stays fp32)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing shards in parallel (memory grows with each; default 1)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                        help=f"largest output shard, e.g. 5GB or 500MB (default {DEFAULT_MAX_SHARD})")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        convert_hf_to_native(args.hf_dir, args.output_dir, dtype=args.dtype, workers=args.workers,
                             max_shard_size=args.max_shard_size)
    except (ConversionError, ConfigError, SafetensorsError) as error:
        print(f"convert_hf_to_native.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
