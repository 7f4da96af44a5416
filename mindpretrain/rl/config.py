"""The `rl_config` YAML section (GRPO): read and validated once at load, into frozen dataclasses.

Every error names the dotted key, the value and the rule, so a wrong YAML line is found without a
traceback; an unknown key fails with "did you mean". The keys follow verl 0.9.1
(`verl/trainer/config/ppo_trainer.yaml`, `actor/actor.yaml`) and slime (`slime/utils/arguments.py`):

=========================================  =============================================  ==================================
rl_config key                              verl                                           slime
=========================================  =============================================  ==================================
data.path                                  data.train_files                               --prompt-data
data.prompt_key / label_key                data.prompt_key / reward_model.ground_truth    --input-key / --label-key
data.max_prompt_length                     data.max_prompt_length (+ filter_overlong_*)   --rollout-max-prompt-len
data.apply_chat_template                   (always, via the tokenizer)                    --apply-chat-template
data.shuffle / seed                        data.shuffle / data.seed                       --rollout-shuffle / --rollout-seed
rollout.n                                  actor_rollout_ref.rollout.n                    --n-samples-per-prompt
rollout.prompts_per_step                   data.train_batch_size                          --rollout-batch-size
rollout.max_response_length                data.max_response_length                       --rollout-max-response-len
rollout.temperature / top_k / top_p        actor_rollout_ref.rollout.{temperature,...}    --rollout-temperature / -top-k / -top-p
rollout.decode_batch_size                  (vLLM/SGLang batch the rows themselves)        (idem)
reward.grader                              custom_reward_function / reward_model          --rm-type / --custom-rm-path
actor.ppo_epochs                           actor_rollout_ref.actor.ppo_epochs             (1)
actor.ppo_mini_batch_size (prompts)        actor_rollout_ref.actor.ppo_mini_batch_size    --global-batch-size / n, i.e.
                                                                                          rollout-batch-size / --num-steps-per-rollout
actor.ppo_micro_batch_size_per_device      actor.ppo_micro_batch_size_per_gpu             --micro-batch-size
actor.clip_ratio_low / high / c            actor.clip_ratio_low / clip_ratio_high /       --eps-clip / --eps-clip-high /
                                           clip_ratio_c (clip_ratio: both low and high)   --eps-clip-c
actor.loss_agg_mode                        actor.loss_agg_mode                            (token-mean; --calculate-per-token-loss)
actor.entropy_coeff                        actor.entropy_coeff                            --entropy-coef
actor.use_kl_loss / kl_loss_coef / type    actor.use_kl_loss / kl_loss_coef / kl_loss_type --use-kl-loss / --kl-loss-coef / --kl-loss-type
actor.norm_adv_by_std_in_grpo              algorithm.norm_adv_by_std_in_grpo              (--disable-grpo-std-normalization)
dynamic_sampling.enable                    algorithm.filter_groups.enable                 --dynamic-sampling-filter-path
dynamic_sampling.over_sampling_batch_size  data.gen_batch_size                            --over-sampling-batch-size
dynamic_sampling.max_num_gen_batches       algorithm.filter_groups.max_num_gen_batches    (regenerates until full)
=========================================  =============================================  ==================================

Ours, for MoE policies: `actor.update_expert_bias` (the aux-loss-free bias rule after each update) and
`actor.use_balance_loss` (the model's balance loss added to the objective), both off as in verl and slime.

verl's harmless spellings are accepted: `top_k: -1` means off (stored as 0, the sampler's "off"), and
`actor.clip_ratio` sets `clip_ratio_low` and `clip_ratio_high` where those are absent, and
`actor.ppo_micro_batch_size_per_gpu` is `ppo_micro_batch_size_per_device`. Seeds stay None
when unset: the caller substitutes the run's seed.

Defaults are verl's where the table maps a key to verl's, except (tests/rl/test_rl_config.py pins both sides):
`clip_ratio_c` null (no dual clip, slime's default; verl 3.0), `max_num_gen_batches` 10 (verl 0: unlimited),
and sizes for a small run: `n` 8, `prompts_per_step` 16, `max_response_length` 256, `ppo_mini_batch_size`
null, i.e. `prompts_per_step` (one on-policy update per rollout; verl 256).
"""
import dataclasses
import difflib
from typing import Optional, Tuple

from mindpretrain.validation import ConfigError, require

SECTION = "rl_config"


@dataclasses.dataclass(frozen=True)
class RLDataConfig:
    paths: Tuple[str, ...]
    prompt_key: str = "prompt"
    label_key: str = "label"
    max_prompt_length: int = 512
    apply_chat_template: bool = True
    tokenizer: Optional[str] = None
    shuffle: bool = True
    seed: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class RLRolloutConfig:
    n: int = 8
    prompts_per_step: int = 16
    max_response_length: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    decode_batch_size: Optional[int] = None
    seed: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class RLRewardConfig:
    grader: str = "deepscaler"
    time_limit: float = 10.0
    on_error: float = 0.0
    max_reward_error_frac: float = 0.1
    shuffle_rewards: bool = False


@dataclasses.dataclass(frozen=True)
class RLActorConfig:
    ppo_epochs: int = 1
    ppo_mini_batch_size: Optional[int] = None
    ppo_micro_batch_size_per_device: Optional[int] = None
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: Optional[float] = None
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    norm_adv_by_std_in_grpo: bool = True
    update_expert_bias: bool = False
    use_balance_loss: bool = False


@dataclasses.dataclass(frozen=True)
class RLDynamicSamplingConfig:
    enable: bool = False
    over_sampling_batch_size: Optional[int] = None
    max_num_gen_batches: int = 10


@dataclasses.dataclass(frozen=True)
class RLConfig:
    data: RLDataConfig
    rollout: RLRolloutConfig
    reward: RLRewardConfig
    actor: RLActorConfig
    dynamic_sampling: RLDynamicSamplingConfig

    @property
    def samples_per_step(self):
        return self.rollout.prompts_per_step * self.rollout.n

    @property
    def mini_batches_per_epoch(self):
        return self.rollout.prompts_per_step // self.actor.ppo_mini_batch_size

    @property
    def on_policy(self):
        """One update per rollout: the old log-probs equal the current policy's (detached), so they are skipped."""
        return self.actor.ppo_epochs == 1 and self.mini_batches_per_epoch == 1


_SECTIONS = {"data": RLDataConfig, "rollout": RLRolloutConfig, "reward": RLRewardConfig,
             "actor": RLActorConfig, "dynamic_sampling": RLDynamicSamplingConfig}
# YAML key -> field name where they differ; and the accepted aliases per section.
_YAML_NAMES = {"data": {"path": "paths"}}
_ALIASES = {"actor": ("clip_ratio", "ppo_micro_batch_size_per_gpu")}


def _unknown_key(dotted, key, known):
    close = difflib.get_close_matches(str(key), list(known), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{dotted} is not an rl_config key{hint}")


def _as_mapping(value, dotted):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{dotted} ({value!r}) must be a mapping")
    return dict(value)


def _section_values(raw, name):
    """The YAML mapping of one section, renamed to field names, with unknown keys refused."""
    cls = _SECTIONS[name]
    renames = _YAML_NAMES.get(name, {})
    yaml_name = {field: key for key, field in renames.items()}
    yaml_keys = [yaml_name.get(f.name, f.name) for f in dataclasses.fields(cls)]
    known = yaml_keys + list(_ALIASES.get(name, ()))
    values = {}
    for key, value in _as_mapping(raw, f"{SECTION}.{name}").items():
        if key not in known:
            raise _unknown_key(f"{SECTION}.{name}.{key}", key, known)
        values[renames.get(key, key)] = value
    return values


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(cls, name, values):
    """Type rules from the dataclass annotations: ints, numbers, bools and strings, Optional allowing null."""
    for field in dataclasses.fields(cls):
        if field.name not in values or field.name == "paths":
            continue
        value, kind = values[field.name], str(field.type)
        dotted = f"{SECTION}.{name}.{field.name}"
        if value is None:
            require("Optional" in kind, dotted, value, "must be set (null is not allowed)")
        elif "int" in kind:
            require(_is_int(value), dotted, value, "must be an integer")
        elif "float" in kind:
            require(_is_number(value), dotted, value, "must be a number")
            values[field.name] = float(value)
        elif "bool" in kind:
            require(isinstance(value, bool), dotted, value, "must be True or False")
        elif "str" in kind:
            require(isinstance(value, str) and value, dotted, value, "must be a non-empty string")


def _positive(value, dotted, allow_none=False):
    if value is None and allow_none:
        return
    require(value > 0, dotted, value, "must be > 0")


def _data(raw):
    values = _section_values(raw, "data")
    _check_types(RLDataConfig, "data", values)
    given = values.get("paths")
    paths = [given] if isinstance(given, str) else given
    require(isinstance(paths, (list, tuple)) and paths and all(isinstance(p, str) and p for p in paths),
            f"{SECTION}.data.path", given, "must be a jsonl path or a non-empty list of paths")
    values["paths"] = tuple(paths)
    config = RLDataConfig(**values)
    _positive(config.max_prompt_length, f"{SECTION}.data.max_prompt_length")
    return config


def _rollout(raw):
    values = _section_values(raw, "rollout")
    _check_types(RLRolloutConfig, "rollout", values)
    config = RLRolloutConfig(**values)
    key = f"{SECTION}.rollout"
    for field in ("n", "prompts_per_step", "max_response_length"):
        _positive(getattr(config, field), f"{key}.{field}")
    _positive(config.decode_batch_size, f"{key}.decode_batch_size", allow_none=True)
    require(config.temperature > 0, f"{key}.temperature", config.temperature, "must be > 0")
    require(0 <= config.top_p <= 1, f"{key}.top_p", config.top_p, "must be in [0, 1] (1: off)")
    require(config.top_k >= -1, f"{key}.top_k", config.top_k, "must be >= -1 (0 or -1: off)")
    return dataclasses.replace(config, top_k=max(config.top_k, 0))


def _reward(raw):
    values = _section_values(raw, "reward")
    _check_types(RLRewardConfig, "reward", values)
    config = RLRewardConfig(**values)
    key = f"{SECTION}.reward"
    require(config.time_limit > 0, f"{key}.time_limit", config.time_limit, "must be > 0 seconds")
    require(0 <= config.max_reward_error_frac <= 1, f"{key}.max_reward_error_frac",
            config.max_reward_error_frac, "must be in [0, 1]")
    return config


def _actor_values(raw):
    values = _section_values(raw, "actor")
    if "clip_ratio" in values:   # verl's shorthand for both sides
        both = values.pop("clip_ratio")
        require(_is_number(both), f"{SECTION}.actor.clip_ratio", both, "must be a number")
        values.setdefault("clip_ratio_low", both)
        values.setdefault("clip_ratio_high", both)
    if "ppo_micro_batch_size_per_gpu" in values:    # verl's name of the same thing
        require("ppo_micro_batch_size_per_device" not in values, f"{SECTION}.actor.ppo_micro_batch_size_per_gpu",
                values["ppo_micro_batch_size_per_gpu"], "and ppo_micro_batch_size_per_device are the same key: give one")
        values["ppo_micro_batch_size_per_device"] = values.pop("ppo_micro_batch_size_per_gpu")
    _check_types(RLActorConfig, "actor", values)
    return values


def _check_actor_kinds(config):
    from mindpretrain.rl.algorithms import KL_KINDS, LOSS_AGG_MODES   # MindSpore only when a config is read
    key = f"{SECTION}.actor"
    require(config.loss_agg_mode in LOSS_AGG_MODES, f"{key}.loss_agg_mode", config.loss_agg_mode,
            f"must be one of {list(LOSS_AGG_MODES)}")
    base = config.kl_loss_type[:-1] if config.kl_loss_type.endswith("+") else config.kl_loss_type
    require(base in KL_KINDS, f"{key}.kl_loss_type", config.kl_loss_type,
            f"must be one of {sorted(KL_KINDS)}, optionally with a '+' suffix")


def _actor(raw, rollout, dp_size):
    config = RLActorConfig(**_actor_values(raw))
    key, rkey = f"{SECTION}.actor", f"{SECTION}.rollout"
    _positive(config.ppo_epochs, f"{key}.ppo_epochs")
    mini = config.ppo_mini_batch_size if config.ppo_mini_batch_size is not None else rollout.prompts_per_step
    _positive(mini, f"{key}.ppo_mini_batch_size")
    require(rollout.prompts_per_step % mini == 0, f"{rkey}.prompts_per_step", rollout.prompts_per_step,
            f"must be divisible by {key}.ppo_mini_batch_size ({mini})")
    require(mini % dp_size == 0, f"{key}.ppo_mini_batch_size", mini,
            f"must be divisible by the data-parallel size ({dp_size}): groups are never split across ranks")
    share = mini * rollout.n // dp_size
    micro = config.ppo_micro_batch_size_per_device
    micro = share if micro is None else micro
    _positive(micro, f"{key}.ppo_micro_batch_size_per_device")
    require(share % micro == 0, f"{key}.ppo_micro_batch_size_per_device", micro,
            f"must divide the per-device mini-batch share ({mini} prompts x {rollout.n} samples / "
            f"{dp_size} devices = {share} samples)")
    for field in ("clip_ratio_low", "clip_ratio_high"):
        require(getattr(config, field) >= 0, f"{key}.{field}", getattr(config, field), "must be >= 0")
    require(config.clip_ratio_c is None or config.clip_ratio_c > 1, f"{key}.clip_ratio_c", config.clip_ratio_c,
            "must be null (no dual clip) or > 1")
    require(config.kl_loss_coef >= 0, f"{key}.kl_loss_coef", config.kl_loss_coef, "must be >= 0")
    _check_actor_kinds(config)
    return dataclasses.replace(config, ppo_mini_batch_size=mini, ppo_micro_batch_size_per_device=micro)


def _dynamic_sampling(raw, rollout, dp_size):
    values = _section_values(raw, "dynamic_sampling")
    _check_types(RLDynamicSamplingConfig, "dynamic_sampling", values)
    config = RLDynamicSamplingConfig(**values)
    key = f"{SECTION}.dynamic_sampling"
    over = config.over_sampling_batch_size
    over = rollout.prompts_per_step if over is None else over
    require(over >= rollout.prompts_per_step, f"{key}.over_sampling_batch_size", over,
            f"must be >= {SECTION}.rollout.prompts_per_step ({rollout.prompts_per_step})")
    require(over % dp_size == 0, f"{key}.over_sampling_batch_size", over,
            f"must be divisible by the data-parallel size ({dp_size}): groups are never split across ranks")
    require(config.max_num_gen_batches >= 0, f"{key}.max_num_gen_batches", config.max_num_gen_batches,
            "must be >= 0 (0: unlimited)")
    return dataclasses.replace(config, over_sampling_batch_size=over)


def _check_rollout_layout(rollout, dp_size):
    key = f"{SECTION}.rollout"
    require(rollout.prompts_per_step % dp_size == 0, f"{key}.prompts_per_step", rollout.prompts_per_step,
            f"must be divisible by the data-parallel size ({dp_size}): groups are never split across ranks")


def rl_config_from_run_config(run_config, dp_size=1):
    """Read and validate `run_config["rl_config"]` once, resolving the null defaults (seeds stay None)."""
    require(_is_int(dp_size) and dp_size > 0, "dp_size", dp_size, "must be a positive integer")
    if run_config.get(SECTION) is None:
        raise ConfigError(f"{SECTION} (None) must be set for run_mode grpo: a mapping with at least data.path")
    raw = _as_mapping(run_config[SECTION], SECTION)
    for key in raw:
        if key not in _SECTIONS:
            raise _unknown_key(f"{SECTION}.{key}", key, _SECTIONS)
    rollout = _rollout(raw.get("rollout"))
    _check_rollout_layout(rollout, dp_size)
    return RLConfig(data=_data(raw.get("data")), rollout=rollout, reward=_reward(raw.get("reward")),
                    actor=_actor(raw.get("actor"), rollout, dp_size),
                    dynamic_sampling=_dynamic_sampling(raw.get("dynamic_sampling"), rollout, dp_size))
