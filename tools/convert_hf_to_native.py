"""Convert a HuggingFace DeepSeek-V3 checkpoint (official fp8 release, or bf16/fp32) into native weights.

    python tools/convert_hf_to_native.py --hf-dir /models/DeepSeek-V3 --output-dir /ckpt/deepseek3-native \\
        [--dtype bf16|fp32] [--mtp require|init|drop] [--workers 4] [--max-shard-size 5GB] \\
        [--register_path research/deepseek3]

A checkpoint saved by transformers keeps `num_nextn_predict_layers` in config.json but has no MTP weights:
--mtp init (default) converts it and the MTP module starts from its initial values when loaded, --mtp drop
writes a model without MTP (num_nextn_predict_layers 0), --mtp require refuses it. Weights saved by MindFormers
under its own names (model.tok_embeddings..., attention.q2l_proj, feed_forward.w1, ...) are recognised from the
names and converted to ours; put the model's config.json next to them.

The model plugin of --register_path (default: this project's research/deepseek3) is imported, and the model
spec reading the directory's config.json `model_type` describes the names and shapes to expect.

Streams shard by shard from memory-mapped files (peak memory about one source shard per worker, never the
model), dequantises fp8 weights with their 128x128 `weight_scale_inv` blocks, keeps the MTP layers, checks every
tensor against the model's name/shape table before writing, and writes into a temporary directory renamed to
--output-dir only when complete and verified. The result is what `run_mindformer.py --load_checkpoint` takes.
"""
import argparse
import os
import sys

from mindpretrain.checkpoint.conversion import MTP_CHOICES, convert_hf_to_native, spec_of_hf_dir
from mindpretrain.checkpoint.conversion_cli import add_writer_arguments, run_conversion

DEFAULT_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research", "deepseek3")


def build_parser():
    parser = argparse.ArgumentParser(prog="convert_hf_to_native.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF directory: config.json + *.safetensors (+ index)")
    parser.add_argument("--output-dir", required=True, help="new directory for the native weights (must not exist "
                                                            "or be empty)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="stored dtype of the weights (default bf16; the expert-score bias stays fp32)")
    parser.add_argument("--mtp", choices=MTP_CHOICES, default="init",
                        help="a checkpoint without MTP weights: init (default: the MTP module starts fresh), drop "
                             "(no MTP in the native model), require (refuse)")
    return add_writer_arguments(parser, DEFAULT_PLUGIN)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_conversion(parser.prog, args.register_path, lambda: convert_hf_to_native(
        args.hf_dir, args.output_dir, dtype=args.dtype, workers=args.workers, max_shard_size=args.max_shard_size,
        spec=spec_of_hf_dir(args.hf_dir), mtp=args.mtp))


if __name__ == "__main__":
    sys.exit(main())
