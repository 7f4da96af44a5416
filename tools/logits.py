"""Write the float32 logits a DeepSeek-V3 checkpoint gives for token ids — to verify a conversion or a load.

    python tools/logits.py --checkpoint DIR --tokens ids.npy --output logits.npy [--device_target CPU] \\
        [--register_path research/deepseek3]

DIR is an HF-layout directory (config.json + *.safetensors [+ index]; fp32, bf16 or the fp8 release) or a native
weights directory of this project (same layout; a training checkpoint with config.yaml works too). ids.npy holds
integer token ids [S] or [B, S]; the output is float32 [B, S, vocab] (main head; [1, S, vocab] for 1-D input).
The model runs in float32 without recompute or MTP layers (they do not touch the main head), PyNative mode. Compare against another implementation with e.g.
`numpy.abs(a - b).max()`. The model plugin of --register_path (default: this project's research/deepseek3) is
imported; the model spec of the checkpoint's config builds the model (through the registry) and loads it.
"""
import argparse
import os
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DEFAULT_PLUGIN = os.path.join(_ROOT, "research", "deepseek3")


def build_parser():
    parser = argparse.ArgumentParser(prog="logits.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="HF or native checkpoint directory")
    parser.add_argument("--tokens", required=True, help=".npy file of integer token ids, shape [S] or [B, S]")
    parser.add_argument("--output", required=True, help=".npy file to write (float32 [B, S, vocab])")
    parser.add_argument("--device_target", default="CPU", help="MindSpore device (default CPU)")
    parser.add_argument("--register_path", default=DEFAULT_PLUGIN,
                        help="model plugin folder (default: this project's research/deepseek3)")
    return parser


def read_tokens(path, vocab_size):
    ids = np.load(path)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, found {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"{path}: expected token ids of shape [S] or [B, S], found {list(ids.shape)}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), found [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32)


def load_plugin(register_path):
    from mindpretrain import registry

    registry.import_register_path(register_path)


def compute_logits(checkpoint, ids, device_target="CPU", register_path=DEFAULT_PLUGIN):
    import mindspore as ms

    from mindpretrain.generation.predict import load_inference_model

    load_plugin(register_path)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device(device_target)
    _, _, model = load_inference_model(checkpoint, ids.shape[1])
    return model(ms.Tensor(ids)).asnumpy().astype(np.float32)


def main(argv=None):
    from mindpretrain.checkpoint.conversion import load_native_config
    from mindpretrain.utils.atomic_files import atomic_write

    args = build_parser().parse_args(argv)
    load_plugin(args.register_path)
    model_config = load_native_config(args.checkpoint)
    ids = read_tokens(args.tokens, model_config.vocab_size)
    logits = compute_logits(args.checkpoint, ids, args.device_target, args.register_path)
    with atomic_write(args.output) as handle:
        np.save(handle, logits)
    print(f"wrote {args.output}: float32 {list(logits.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
