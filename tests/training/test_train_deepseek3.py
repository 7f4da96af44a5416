"""The real tiny DeepSeek-V3 (configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml) trained on WikiText-2
from ../shared with the DeepSeek-V3 tokenizer: the loss falls from about ln(vocab), the expert biases
follow the aux-loss-free rule step by step, and a resume from the middle checkpoint is bit-exact.

One model and one compiled train step serve the whole module (compiling takes most of the time).
"""
import math

import numpy as np
import pytest

from conftest import PROJECT_ROOT, shared_path

ms = pytest.importorskip("mindspore")

TINY = PROJECT_ROOT / "configs" / "deepseek3" / "pretrain_deepseek3_tiny_cpu.yaml"
STEPS, SAVE_AT = 8, 4


@pytest.fixture(scope="module")
def wikitext_prefix(tmp_path_factory):
    from research.deepseek3 import wikitext_to_bin

    source = shared_path("data", "wikitext-2", "valid.txt")
    tokenizer = shared_path("data", "deepseek-v3-tokenizer", "tokenizer.json")
    prefix = tmp_path_factory.mktemp("wiki") / "wiki"
    assert wikitext_to_bin.main(["--input", str(source), "--output-prefix", str(prefix), "--vocab-file",
                                 str(tokenizer), "--seq-length", "64"]) == 0
    return f"{prefix}_text_document"


@pytest.fixture(scope="module")
def run(wikitext_prefix, tmp_path_factory):
    import mindpretrain.data.loader  # noqa: F401
    import mindpretrain.training  # noqa: F401
    from mindpretrain import registry
    from mindpretrain.config import load_config
    from mindpretrain.model_builder import build_model
    from mindpretrain.training.settings import RunSettings
    from mindpretrain.training.trainer import Trainer

    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.set_seed(1234)
    config = load_config(str(TINY), [
        f"train_dataset.data_loader.config.data_path=[{wikitext_prefix}]",
        "train_dataset.data_loader.config.seq_length=64", f"runner_config.train_steps={STEPS}",
        "runner_config.batch_size=2", "lr_schedule.warmup_steps=2", "lr_schedule.learning_rate=5.e-3",
        "seed=1234"])
    config["callbacks"][1]["save_checkpoint_steps"] = SAVE_AT
    model_config, model = build_model(config, "CPU")
    output = tmp_path_factory.mktemp("tiny")
    trainer = Trainer(RunSettings.from_config(config, output_dir=str(output)), model, model_config)
    bias_steps = []
    apply_bias = trainer._reduce_expert_load

    def record_bias_update(load):
        before = [bias.asnumpy().copy() for bias in model.moe_layer_biases()]
        apply_bias(load)
        after = [bias.asnumpy().copy() for bias in model.moe_layer_biases()]
        bias_steps.append((np.array(load), before, after))

    trainer._reduce_expert_load = record_bias_update
    summary = trainer.train()
    history = list(trainer.history)
    final_params = {name: param.asnumpy().copy() for name, param in trainer.params.items()}
    return trainer, summary, history, bias_steps, final_params, output


def test_loss_starts_near_ln_vocab_and_falls(run):
    trainer, summary, history, _, _, _ = run
    vocab = trainer.model_config.vocab_size
    lm_losses = [m["lm_loss"] for m in history]
    assert summary["status"] == "completed" and len(history) == STEPS
    assert abs(lm_losses[0] - math.log(vocab)) < 0.5, lm_losses
    assert np.mean(lm_losses[-2:]) < lm_losses[0] - 0.3, lm_losses
    assert all(m["mtp_loss"] > 0 and math.isfinite(m["grad_norm"]) for m in history)
    # MFU is its definition (tokens/s x FLOPs per token / peak), whatever the machine's speed
    from mindpretrain.training.progress import flops_per_token_or_none

    settings = trainer.settings
    flops = flops_per_token_or_none(trainer.model_config, settings.seq_length)
    assert flops > 0 and settings.device_peak_tflops > 0
    last = history[-1]
    assert last["mfu"] == pytest.approx(last["tokens_per_second"] * flops / (settings.device_peak_tflops * 1e12),
                                        rel=1e-9)


def test_expert_bias_follows_the_load_every_step(run):
    trainer, _, _, bias_steps, _, _ = run
    rate = trainer.model_config.topk_bias_update_rate
    assert len(bias_steps) == STEPS
    for load, before, after in bias_steps:
        assert load.shape == (trainer.model_config.num_moe_layers, trainer.model_config.n_routed_experts)
        for layer, (old, new) in enumerate(zip(before, after)):
            expected = old + rate * np.sign(load[layer].mean() - load[layer])
            np.testing.assert_allclose(new, expected, atol=1e-7)
            overloaded = int(np.argmax(load[layer]))
            assert new[overloaded] < old[overloaded]  # the busiest expert gets less attractive


def test_resume_from_middle_checkpoint_is_bit_exact(run):
    trainer, _, history, _, final_params, output = run
    from mindpretrain.training import checkpoint as ckpt

    directory = trainer.resume(f"{output}/checkpoint/{ckpt.step_dir_name(SAVE_AT)}")
    assert trainer.step == SAVE_AT
    trainer.history = []
    trainer.train()
    for mine, theirs in zip(trainer.history, history[SAVE_AT:]):
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr"):
            assert mine[key] == theirs[key], (mine["step"], key)
    for name, value in final_params.items():
        np.testing.assert_array_equal(trainer.params[name].asnumpy(), value, err_msg=name)
    assert directory.endswith(ckpt.step_dir_name(SAVE_AT))


def test_load_checkpoint_accepts_a_hugging_face_directory(tmp_path):
    """--load_checkpoint with an HF DeepSeek-V3 directory (sharded safetensors + index) loads every weight."""
    from conftest import require_reference

    require_reference("transformers")
    from hf_reference import build_tiny_hf_deepseek_v3

    import mindpretrain.training  # noqa: F401
    from mindpretrain.checkpoint.safetensors_io import open_safetensors, read_checkpoint_dir
    from mindpretrain.config import load_config
    from mindpretrain.training.checkpoint import CheckpointError
    from mindpretrain.training.settings import RunSettings
    from mindpretrain.training.trainer import Trainer
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    _, hf_dir = build_tiny_hf_deepseek_v3(tmp_path)
    model_config = DeepseekV3Config.from_hf(hf_dir)
    config = load_config(str(TINY), ["train_dataset.data_loader.config.seq_length=16"])
    trainer = Trainer(RunSettings.from_config(config, output_dir=str(tmp_path / "out")),
                      DeepseekV3ForCausalLM(model_config), model_config)
    trainer.checkpoints.load_weights(hf_dir)
    located = read_checkpoint_dir(hf_dir)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.e_score_correction_bias", "lm_head.weight"):
        with open_safetensors(located[name]) as handle:
            np.testing.assert_array_equal(trainer.params[name].asnumpy(), handle.get(name).astype(np.float32))
    other_config = model_config.replace(hidden_size=32, q_lora_rank=16)
    other = Trainer(RunSettings.from_config(config, output_dir=str(tmp_path / "other")),
                    DeepseekV3ForCausalLM(other_config), other_config)
    with pytest.raises(CheckpointError, match=hf_dir):
        other.checkpoints.load_weights(hf_dir)
