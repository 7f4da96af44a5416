"""What the two conversion command lines share: the writer flags, the plugin import and the error exit."""
import sys

from mindpretrain import registry
from mindpretrain.checkpoint.conversion import DEFAULT_MAX_SHARD, ConversionError
from mindpretrain.checkpoint.safetensors_io import SafetensorsError
from mindpretrain.validation import ConfigError


def add_writer_arguments(parser, default_plugin):
    """--workers, --max-shard-size and --register_path (the model plugin whose spec describes the weights)."""
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing shards in parallel (memory grows with each; default 1)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                        help=f"largest output shard, e.g. 5GB or 500MB (default {DEFAULT_MAX_SHARD})")
    parser.add_argument("--register_path", default=default_plugin,
                        help="model plugin folder (default: this project's research/deepseek3)")
    return parser


def run_conversion(prog, register_path, convert):
    """Import the plugin, run `convert()`; a bad input is one `prog: error: ...` line and exit code 1."""
    try:
        registry.import_register_path(register_path)
        convert()
    except (ConversionError, ConfigError, SafetensorsError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    return 0
