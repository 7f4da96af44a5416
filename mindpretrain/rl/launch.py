"""`run_mindformer.py --run_mode grpo`: everything a GRPO run reads is checked before anything is built.

Order: the `rl_config` section (against the data-parallel size msrun gives), the tokenizer and chat template,
every prompt line (a malformed one stops the run naming `file:line`, before any compute), then the process set-up
and the policy (`training.launch.setup_run`), its initial weights (`load_checkpoint`: native, HF or MindFormers
names), the frozen reference copy (only with a KL loss), the reward grader, and the loop.
"""
from mindpretrain.utils.logging import get_logger
from mindpretrain.validation import require

logger = get_logger("grpo")


def data_parallel_size(run_config):
    """Ranks of a GRPO run: the msrun workers (CPU and stand-alone data parallelism; semi-auto is not used)."""
    from mindpretrain.training.launch import launched_by_msrun

    workers, _ = launched_by_msrun()
    return workers if run_config.get("use_parallel") else 1


def load_task(run_config, rl_config, tokenizer_option=None):
    """(tokenizer, PromptSet): the tokenizer of `--tokenizer`, `rl_config.data.tokenizer`, the YAML's
    processor.tokenizer or the initial checkpoint; its chat template when `data.apply_chat_template`."""
    from mindpretrain.data.chat_template import ChatTemplateError, load_chat_template
    from mindpretrain.generation.predict import load_prompt_tokenizer, tokenizer_path
    from mindpretrain.rl.prompts import load_prompts
    from mindpretrain.validation import ConfigError

    path = tokenizer_path(run_config, tokenizer_option or rl_config.data.tokenizer,
                          run_config.get("load_checkpoint") or ".")
    tokenizer = load_prompt_tokenizer(path)
    template = None
    if rl_config.data.apply_chat_template:
        try:
            template = load_chat_template(path)
        except ChatTemplateError as error:
            raise ConfigError(f"rl_config.data.apply_chat_template (True): {error}") from None
    prompts = load_prompts(rl_config.data, tokenizer, template)
    logger.info("GRPO prompts: %d from %s (%d longer than %d tokens dropped)", len(prompts),
                ", ".join(prompts.sources), prompts.filtered_overlong, rl_config.data.max_prompt_length)
    return tokenizer, prompts


def frozen_copy(model, model_config):
    """A second model of the same config holding the policy's current values, never trained: the reference."""
    import mindspore as ms
    from mindpretrain import registry

    reference = registry.get("model", type(model).__name__)(model_config)
    values = {param.name: param for param in model.get_parameters()}
    for param in reference.get_parameters():
        param.set_data(ms.Tensor(values[param.name].asnumpy()))
        param.requires_grad = False
    return reference


def run_grpo(run_config, tokenizer_option=None):
    """Set up, train, return the loop's summary."""
    from mindpretrain.parallel.plan import SEMI_AUTO_PARALLEL
    from mindpretrain.rl.config import rl_config_from_run_config
    from mindpretrain.rl.grpo_trainer import GRPOTrainer
    from mindpretrain.rl.rewards import RewardRunner
    from mindpretrain.training.launch import setup_run

    rl_config = rl_config_from_run_config(run_config, data_parallel_size(run_config))
    tokenizer, prompts = load_task(run_config, rl_config, tokenizer_option)
    context = setup_run(run_config)
    require(context.pipeline is None and context.plan.mode != SEMI_AUTO_PARALLEL, "run_mode", "grpo",
            "runs data-parallel (stand-alone or msrun on CPU); semi-auto parallel layouts are not supported yet")
    load_checkpoint = run_config.get("load_checkpoint") or None
    resume = bool(run_config.get("resume_training"))
    if load_checkpoint:     # the initial policy, and so the reference, also when resuming (checkpoint: output_dir)
        from mindpretrain.training.checkpoint import CheckpointManager

        CheckpointManager(context.settings, context.dp, {p.name: p for p in context.model.get_parameters()},
                          None, None, context.model, context.model_config,
                          getattr(context.model_config, "expert_layout", None)).load_weights(load_checkpoint)
    reference = frozen_copy(context.model, context.model_config) if rl_config.actor.use_kl_loss else None
    reward = rl_config.reward
    with RewardRunner(reward.grader, reward.time_limit, reward.on_error, reward.max_reward_error_frac) as rewards:
        trainer = GRPOTrainer(context, rl_config, prompts, tokenizer, reference, rewards,
                              seed=int(run_config.get("seed", 0) or 0))
        return trainer.train(resume=resume)
