"""YAML loading: base_config inheritance, command-line overrides and error messages."""
import textwrap

import pytest

from mindpretrain.config import apply_override, load_config, parse_override_args
from mindpretrain.validation import ConfigError, require


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tree(tmp_path):
    write(tmp_path / "base" / "model.yaml", """
        model:
          model_config: {hidden_size: 64, num_layers: 2, dropout: 0.1}
        optimizer: {type: AdamW, betas: [0.9, 0.95]}
        seed: 1
    """)
    write(tmp_path / "base" / "data.yaml", """
        base_config: model.yaml
        train_dataset: {data_loader: {sizes: [10, 0, 0]}}
        model:
          model_config: {num_layers: 3}
        seed: 2
    """)
    write(tmp_path / "base" / "runner.yaml", """
        runner_config: {batch_size: 2}
        seed: 3
    """)
    return write(tmp_path / "run.yaml", """
        base_config: [base/data.yaml, base/runner.yaml]
        model:
          model_config: {hidden_size: 128}
        optimizer: {betas: [0.8, 0.9]}
    """)


def test_base_config_merged_depth_first_in_order(tree):
    config = load_config(str(tree))
    assert config.model.model_config == {"hidden_size": 128, "num_layers": 3, "dropout": 0.1}
    assert config.seed == 3                     # runner.yaml is listed after data.yaml
    assert config.optimizer == {"type": "AdamW", "betas": [0.8, 0.9]}  # lists are replaced, not merged
    assert config.train_dataset.data_loader.sizes == [10, 0, 0]
    assert "base_config" not in config


def test_overrides_are_typed_and_applied_last(tree):
    overrides = parse_override_args(["--model.model_config.num_layers=4", "--seed", "7",
                                     "--optimizer.betas=[0.5, 0.6]", "--+runner_config.sink_mode=False"])
    config = load_config(str(tree), overrides)
    assert config.model.model_config.num_layers == 4
    assert config.seed == 7
    assert config.optimizer.betas == [0.5, 0.6]
    assert config.runner_config.sink_mode is False


def test_override_of_unknown_key_names_it_and_suggests(tree):
    with pytest.raises(ConfigError, match=r"key model.model_config.num_layer does not exist.*num_layers"):
        load_config(str(tree), ["model.model_config.num_layer=4"])
    with pytest.raises(ConfigError, match=r"seed is a value"):
        load_config(str(tree), ["seed.x=4"])


def test_override_reaches_list_items():
    config = {"callbacks": [{"type": "A"}, {"type": "B", "steps": 20}], "betas": [0.9, 0.95]}
    apply_override(config, "callbacks.1.steps=50")
    apply_override(config, "betas.-1=0.99")
    assert config == {"callbacks": [{"type": "A"}, {"type": "B", "steps": 50}], "betas": [0.9, 0.99]}
    with pytest.raises(ConfigError, match=r"'2' is not a position in a list of 2 items \(use 0 to 1\)"):
        apply_override(config, "callbacks.2.steps=1")
    with pytest.raises(ConfigError, match="'x' is not a position"):
        apply_override(config, "betas.x=1")


def test_bad_override_arguments():
    with pytest.raises(ConfigError, match="overrides look like"):
        parse_override_args(["model.x=1"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_override_args(["--model.x"])


def test_cycle_and_missing_base_are_named(tmp_path):
    write(tmp_path / "a.yaml", "base_config: b.yaml\nx: 1\n")
    write(tmp_path / "b.yaml", "base_config: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    write(tmp_path / "c.yaml", "base_config: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(str(tmp_path / "c.yaml"))
    write(tmp_path / "d.yaml", "x: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "d.yaml"))
    write(tmp_path / "e.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(tmp_path / "e.yaml"))


def test_require_names_key_value_and_rule():
    with pytest.raises(ConfigError) as error:
        require(8 % 3 == 0, "num_heads", 8, "must be divisible by model_parallel (3)")
    assert str(error.value) == "num_heads (8) must be divisible by model_parallel (3)"
