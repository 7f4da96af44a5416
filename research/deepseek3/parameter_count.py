"""Parameter counts of a DeepSeek-V3 config, computed from the name/shape table (`weight_mapping`).

Conventions (the numbers DeepSeek publishes follow from them):

* **total (main model)**: every tensor of the main model, the non-trained `e_score_correction_bias` included,
  MTP modules excluded. The 671B config gives exactly 671,026,419,200.
* **MTP**: the MTP modules' own tensors (their embedding and output head are the main model's, so not counted
  again). `release_total` adds the two copies the HF release stores per MTP module (685B for 671B + MTP).
* **activated per token**: the tensors that take part in computing one token's next-token distribution: all
  main-model tensors except the routed experts a token is not sent to (`num_experts_per_tok` of
  `n_routed_experts` per MoE layer). Embedding and output head count in full, as in the total; this gives
  37.55B for the 671B config, the "37B activated" of the DeepSeek-V3 report. `activated_main_excluding_embedding`
  counts only the one embedding row a token looks up (36.63B), for readers who use that convention.

CLI: `python research/deepseek3/parameter_count.py --config path/to/run.yaml` prints the table.
"""
import argparse
import os
import sys
from collections import OrderedDict

if __package__ in (None, ""):   # run as a script: make `research.deepseek3` importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from research.deepseek3.weight_mapping import parameter_specs, release_parameter_shapes  # noqa: E402


def _numel(shape):
    count = 1
    for size in shape:
        count *= int(size)
    return count


def count_parameters(model_config):
    """-> OrderedDict of counts (ints) described in the module docstring, plus `by_group` per group name."""
    specs, layers = parameter_specs(model_config), model_config.num_hidden_layers
    main = [spec for spec in specs if spec.layer is None or spec.layer < layers]
    mtp = [spec for spec in specs if spec.layer is not None and spec.layer >= layers]
    fraction = model_config.num_experts_per_tok / model_config.n_routed_experts

    def activated(subset):
        routed = sum(_numel(spec.shape) for spec in subset if spec.group == "routed_expert")
        others = sum(_numel(spec.shape) for spec in subset if spec.group != "routed_expert")
        # every expert of a layer has the same shape, so k/E of the routed tensors is exactly k experts' worth
        return others + int(round(routed * fraction))

    by_group = OrderedDict()
    for spec in main:
        by_group[spec.group] = by_group.get(spec.group, 0) + _numel(spec.shape)
    total_main = sum(_numel(spec.shape) for spec in main)
    total_mtp = sum(_numel(spec.shape) for spec in mtp)
    activated_main = activated(main)
    embedding = _numel((model_config.vocab_size, model_config.hidden_size))
    return OrderedDict([
        ("total_main", total_main),
        ("trainable_main", sum(_numel(spec.shape) for spec in main if spec.trainable)),
        ("mtp", total_mtp),
        ("total_with_mtp", total_main + total_mtp),
        ("release_total", sum(_numel(shape) for shape in release_parameter_shapes(model_config).values())),
        ("activated_main", activated_main),
        ("activated_main_excluding_embedding", activated_main - embedding + model_config.hidden_size),
        ("activated_mtp", activated(mtp)),
        ("by_group", by_group),
    ])


def format_counts(counts):
    lines = []
    for key, value in counts.items():
        if key == "by_group":
            for group, number in value.items():
                lines.append(f"  {group:<32} {number:>20,}")
        else:
            lines.append(f"{key:<34} {value:>20,}  ({value / 1e9:.2f}B)")
    return "\n".join(lines)


def main(argv=None):
    from mindpretrain.config import load_config
    from research.deepseek3.deepseek3_config import DeepseekV3Config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run YAML (model.model_config is read); default: the 671B release")
    args = parser.parse_args(argv)
    if args.config:
        values = dict(load_config(args.config).to_dict()["model"]["model_config"])
        values.pop("type", None)
        model_config = DeepseekV3Config(**values)
    else:
        model_config = DeepseekV3Config()
    print(format_counts(count_parameters(model_config)))


if __name__ == "__main__":
    main()
