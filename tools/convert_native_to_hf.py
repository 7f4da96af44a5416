"""Write a HuggingFace DeepSeek-V3 directory from native weights or a training checkpoint, for transformers,
vLLM and SGLang.

    python tools/convert_native_to_hf.py --checkpoint /ckpt/deepseek3-native --output-dir /models/mine-hf \\
        [--dtype bf16|fp32] [--fp8] [--tokenizer-dir /models/DeepSeek-V3] [--workers 4] [--max-shard-size 5GB] \\
        [--register_path research/deepseek3]

The output has the release's names and shapes (MTP layers and their copies of the embedding/head included),
`config.json`, sharded `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, and the tokenizer
files of --tokenizer-dir. --fp8 re-quantises the weights the release quantises (every 2-D linear weight of the
decoder blocks) to e4m3 with float32 128x128 `weight_scale_inv` blocks and adds the release's
`quantization_config`. Written into a temporary directory renamed to --output-dir only when complete and verified.
The model plugin of --register_path (default: this project's research/deepseek3) is imported; its model spec is
found from the checkpoint's config.json `model_type` or config.yaml `model.model_config.type`.
"""
import argparse
import os
import sys

from mindpretrain.checkpoint.conversion import convert_native_to_hf, spec_of_native
from mindpretrain.checkpoint.conversion_cli import add_writer_arguments, run_conversion

DEFAULT_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research", "deepseek3")


def build_parser():
    parser = argparse.ArgumentParser(prog="convert_native_to_hf.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="native weights directory (config.json) or training checkpoint step directory "
                             "(model.safetensors + config.yaml); optimizer state is skipped")
    parser.add_argument("--output-dir", required=True, help="new HF directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="dtype of the unquantised tensors (default bf16, as released)")
    parser.add_argument("--fp8", action="store_true", help="fp8 e4m3 block quantisation as in the official release")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="directory whose tokenizer.json / tokenizer_config.json / ... are copied")
    return add_writer_arguments(parser, DEFAULT_PLUGIN)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_conversion(parser.prog, args.register_path, lambda: convert_native_to_hf(
        args.checkpoint, args.output_dir, dtype=args.dtype, quantise_fp8=args.fp8, tokenizer_dir=args.tokenizer_dir,
        workers=args.workers, max_shard_size=args.max_shard_size, spec=spec_of_native(args.checkpoint)))


if __name__ == "__main__":
    sys.exit(main())
