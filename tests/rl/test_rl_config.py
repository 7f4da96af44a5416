"""The `rl_config` reader: values read as written, null defaults resolved, and every error naming key and value.

The defaults are also compared with verl 0.9.1's own: its flattened trainer configuration
(`verl/trainer/config/_generated_ppo_trainer.yaml`, what `ppo_trainer.yaml` composes to) is read as plain YAML,
so verl's import chain (ray, ...) is never touched. Where the module docstring maps a key to a verl key of the
same meaning, verl's default value fed through our reader must give our default; the few defaults that differ
on purpose are pinned on both sides, so a change in either is noticed.
"""
import copy
import dataclasses
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import yaml

from conftest import require_reference
from mindpretrain.rl.algorithms import KL_KINDS, LOSS_AGG_MODES
from mindpretrain.rl.config import (RLActorConfig, RLConfig, RLDataConfig, RLDynamicSamplingConfig, RLRewardConfig,
                                    RLRolloutConfig, rl_config_from_run_config)
from mindpretrain.validation import ConfigError

VERL_VERSION = "0.9.1"
VERL_TRAINER_YAML = ("trainer", "config", "_generated_ppo_trainer.yaml")


def read(dp_size=1, **sections):
    """The reader over a run config whose rl_config holds `sections`, with `data.path` given unless overridden."""
    sections.setdefault("data", {"path": "prompts.jsonl"})
    return rl_config_from_run_config({"rl_config": sections}, dp_size=dp_size)


def error_of(dp_size=1, **sections):
    with pytest.raises(ConfigError) as info:
        read(dp_size=dp_size, **sections)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------
# values read as written

COMPLETE = dict(
    data=dict(path=["a.jsonl", "b.jsonl"], prompt_key="question", label_key="answer", max_prompt_length=1024,
              apply_chat_template=False, tokenizer="tokenizer_dir", shuffle=False, seed=7),
    rollout=dict(n=4, prompts_per_step=8, max_response_length=300, temperature=0.7, top_k=20, top_p=0.95,
                 decode_batch_size=16, seed=11),
    reward=dict(grader="math_verify", time_limit=2.5, on_error=-1.0, max_reward_error_frac=0.25,
                shuffle_rewards=True),
    actor=dict(ppo_epochs=2, ppo_mini_batch_size=4, ppo_micro_batch_size_per_device=2, clip_ratio_low=0.1,
               clip_ratio_high=0.28, clip_ratio_c=3.5, loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.001,
               use_kl_loss=True, kl_loss_coef=0.01, kl_loss_type="k3+", norm_adv_by_std_in_grpo=False,
               update_expert_bias=True, use_balance_loss=True),
    dynamic_sampling=dict(enable=True, over_sampling_batch_size=12, max_num_gen_batches=3),
)
SECTION_CLASSES = dict(data=RLDataConfig, rollout=RLRolloutConfig, reward=RLRewardConfig, actor=RLActorConfig,
                       dynamic_sampling=RLDynamicSamplingConfig)


def test_complete_section_covers_every_field():
    """COMPLETE sets every key, so the next test checks every value (a new field must be added there)."""
    for name, cls in SECTION_CLASSES.items():
        fields = {"path" if field.name == "paths" else field.name for field in dataclasses.fields(cls)}
        assert set(COMPLETE[name]) == fields, name


def test_complete_section_reads_every_value_as_given():
    run_config = {"rl_config": copy.deepcopy(COMPLETE)}
    config = rl_config_from_run_config(run_config, dp_size=2)
    assert run_config == {"rl_config": COMPLETE}   # the caller's mapping is left as written
    data = dict(COMPLETE["data"])
    expected = RLConfig(data=RLDataConfig(paths=tuple(data.pop("path")), **data),
                        rollout=RLRolloutConfig(**COMPLETE["rollout"]), reward=RLRewardConfig(**COMPLETE["reward"]),
                        actor=RLActorConfig(**COMPLETE["actor"]),
                        dynamic_sampling=RLDynamicSamplingConfig(**COMPLETE["dynamic_sampling"]))
    assert config == expected
    assert config.data.paths == ("a.jsonl", "b.jsonl")
    assert (config.samples_per_step, config.mini_batches_per_epoch, config.on_policy) == (32, 2, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.actor.ppo_epochs = 1


def test_minimal_section_defaults():
    config = read(data={"path": "prompts.jsonl"})
    assert dataclasses.asdict(config) == {
        "data": dict(paths=("prompts.jsonl",), prompt_key="prompt", label_key="label", max_prompt_length=512,
                     apply_chat_template=True, tokenizer=None, shuffle=True, seed=None),
        "rollout": dict(n=8, prompts_per_step=16, max_response_length=256, temperature=1.0, top_k=0, top_p=1.0,
                        decode_batch_size=None, seed=None),
        "reward": dict(grader="deepscaler", time_limit=10.0, on_error=0.0, max_reward_error_frac=0.1,
                       shuffle_rewards=False),
        "actor": dict(ppo_epochs=1, ppo_mini_batch_size=16, ppo_micro_batch_size_per_device=128,
                      clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=None, loss_agg_mode="token-mean",
                      entropy_coeff=0.0, use_kl_loss=False, kl_loss_coef=0.001, kl_loss_type="low_var_kl",
                      norm_adv_by_std_in_grpo=True, update_expert_bias=False, use_balance_loss=False),
        "dynamic_sampling": dict(enable=False, over_sampling_batch_size=16, max_num_gen_batches=10),
    }
    assert (config.samples_per_step, config.mini_batches_per_epoch, config.on_policy) == (128, 1, True)


def test_empty_sections_and_explicit_nulls_read_as_defaults():
    config = read(data={"path": "prompts.jsonl", "seed": None, "tokenizer": None}, rollout=None, reward=None,
                  actor={"clip_ratio_c": None, "ppo_mini_batch_size": None}, dynamic_sampling=None)
    assert config == read()


def test_integers_given_for_number_keys_are_stored_as_floats():
    config = read(rollout={"temperature": 1, "top_p": 1}, actor={"clip_ratio": 0, "clip_ratio_c": 3},
                  reward={"time_limit": 5})
    values = [config.rollout.temperature, config.rollout.top_p, config.actor.clip_ratio_low,
              config.actor.clip_ratio_high, config.actor.clip_ratio_c, config.reward.time_limit]
    assert values == [1.0, 1.0, 0.0, 0.0, 3.0, 5.0]
    assert all(type(value) is float for value in values)


@pytest.mark.parametrize("top_k, stored", [(-1, 0), (0, 0), (1, 1), (50, 50)])
def test_top_k_minus_one_is_stored_as_off(top_k, stored):
    assert read(rollout={"top_k": top_k}).rollout.top_k == stored


@pytest.mark.parametrize("actor, low, high", [
    ({"clip_ratio": 0.3}, 0.3, 0.3),
    ({"clip_ratio": 0.3, "clip_ratio_high": 0.28}, 0.3, 0.28),
    ({"clip_ratio": 0.3, "clip_ratio_low": 0.1}, 0.1, 0.3),
    ({"clip_ratio": 0.3, "clip_ratio_low": 0.1, "clip_ratio_high": 0.28}, 0.1, 0.28),
    ({"clip_ratio_high": 0.28}, 0.2, 0.28),
])
def test_verl_clip_ratio_sets_the_sides_not_given(actor, low, high):
    config = read(actor=actor).actor
    assert (config.clip_ratio_low, config.clip_ratio_high) == (low, high)


# (prompts_per_step, n, dp_size, actor keys) -> (mini batch, micro batch, mini batches per epoch, on-policy)
LAYOUTS = [
    ((16, 8, 1, {}), (16, 128, 1, True)),
    ((16, 8, 4, {}), (16, 32, 1, True)),
    ((16, 8, 4, {"ppo_mini_batch_size": 4}), (4, 8, 4, False)),
    ((16, 8, 2, {"ppo_micro_batch_size_per_device": 4}), (16, 4, 1, True)),   # accumulation stays on-policy
    ((8, 2, 1, {"ppo_epochs": 2}), (8, 16, 1, False)),
    ((12, 3, 3, {"ppo_mini_batch_size": 6, "ppo_micro_batch_size_per_device": 2}), (6, 2, 2, False)),
]


@pytest.mark.parametrize("layout, expected", LAYOUTS)
def test_batch_defaults_and_policy_layout(layout, expected):
    prompts, n, dp_size, actor = layout
    config = read(dp_size=dp_size, rollout={"prompts_per_step": prompts, "n": n}, actor=actor)
    assert (config.actor.ppo_mini_batch_size, config.actor.ppo_micro_batch_size_per_device,
            config.mini_batches_per_epoch, config.on_policy) == expected
    assert config.samples_per_step == prompts * n


@pytest.mark.parametrize("dynamic_sampling, prompts, stored", [
    ({}, 16, 16), ({"enable": True}, 32, 32), ({"enable": True, "over_sampling_batch_size": 24}, 16, 24)])
def test_over_sampling_batch_size_defaults_to_prompts_per_step(dynamic_sampling, prompts, stored):
    config = read(rollout={"prompts_per_step": prompts}, dynamic_sampling=dynamic_sampling)
    assert config.dynamic_sampling.over_sampling_batch_size == stored


@pytest.mark.parametrize("kind", sorted(KL_KINDS) + [kind + "+" for kind in sorted(KL_KINDS)])
def test_every_kl_kind_is_accepted_with_or_without_plus(kind):
    assert read(actor={"kl_loss_type": kind}).actor.kl_loss_type == kind


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_every_loss_agg_mode_is_accepted(mode):
    assert read(actor={"loss_agg_mode": mode}).actor.loss_agg_mode == mode


@pytest.mark.parametrize("rollout", [{"top_p": 0.0}, {"top_p": 1.0}, {"temperature": 1e-3}, {"top_k": -1}])
def test_sampling_boundaries_are_accepted(rollout):
    assert read(rollout=rollout).rollout == dataclasses.replace(RLRolloutConfig(), **{**rollout, "top_k": 0})


# ---------------------------------------------------------------------------------------------------
# errors: each names the dotted key, the value and the rule

UNKNOWN_KEYS = [
    (dict(rollut={}), "rl_config.rollut is not an rl_config key (did you mean rollout?)"),
    (dict(data={"path": "p.jsonl", "prompt_kye": "q"}),
     "rl_config.data.prompt_kye is not an rl_config key (did you mean prompt_key?)"),
    (dict(data={"paths": ["p.jsonl"]}), "rl_config.data.paths is not an rl_config key (did you mean path"),
    (dict(rollout={"temprature": 0.5}), "rl_config.rollout.temprature is not an rl_config key (did you mean "
                                        "temperature?)"),
    (dict(reward={"grade": "deepscaler"}), "rl_config.reward.grade is not an rl_config key (did you mean grader?)"),
    (dict(actor={"ppo_micro_batch_size_per_gpus": 2}), "rl_config.actor.ppo_micro_batch_size_per_gpus is not an "
                                                       "rl_config key (did you mean ppo_micro_batch_size_per_gpu"),
    (dict(actor={"clip_ration": 0.2}), "rl_config.actor.clip_ration is not an rl_config key (did you mean "
                                       "clip_ratio, "),
    (dict(dynamic_sampling={"enabled": True}), "rl_config.dynamic_sampling.enabled is not an rl_config key (did you "
                                               "mean enable?)"),
]


@pytest.mark.parametrize("sections, expected", UNKNOWN_KEYS, ids=lambda value: str(value)[:40])
def test_unknown_keys_name_the_key_and_the_closest_names(sections, expected):
    assert error_of(**sections).startswith(expected)


def test_unknown_key_without_a_close_name_has_no_hint():
    assert error_of(actor={"zzzz": 1}) == "rl_config.actor.zzzz is not an rl_config key"


WRONG_TYPES = [
    (dict(rollout={"n": "8"}), "rl_config.rollout.n ('8') must be an integer"),
    (dict(rollout={"n": True}), "rl_config.rollout.n (True) must be an integer"),
    (dict(rollout={"prompts_per_step": 16.0}), "rl_config.rollout.prompts_per_step (16.0) must be an integer"),
    (dict(rollout={"seed": False}), "rl_config.rollout.seed (False) must be an integer"),
    (dict(rollout={"temperature": "hot"}), "rl_config.rollout.temperature ('hot') must be a number"),
    (dict(rollout={"top_p": True}), "rl_config.rollout.top_p (True) must be a number"),
    (dict(actor={"clip_ratio": "0.2"}), "rl_config.actor.clip_ratio ('0.2') must be a number"),
    (dict(actor={"clip_ratio": None}), "rl_config.actor.clip_ratio (None) must be a number"),
    (dict(actor={"use_kl_loss": "yes"}), "rl_config.actor.use_kl_loss ('yes') must be True or False"),
    (dict(data={"path": "p.jsonl", "shuffle": 1}), "rl_config.data.shuffle (1) must be True or False"),
    (dict(data={"path": "p.jsonl", "prompt_key": ""}), "rl_config.data.prompt_key ('') must be a non-empty string"),
    (dict(reward={"grader": 3}), "rl_config.reward.grader (3) must be a non-empty string"),
    (dict(actor={"ppo_epochs": None}), "rl_config.actor.ppo_epochs (None) must be set (null is not allowed)"),
    (dict(rollout={"temperature": None}), "rl_config.rollout.temperature (None) must be set (null is not allowed)"),
    (dict(actor={"loss_agg_mode": None}), "rl_config.actor.loss_agg_mode (None) must be set (null is not allowed)"),
    (dict(rollout=[1, 2]), "rl_config.rollout ([1, 2]) must be a mapping"),
]


@pytest.mark.parametrize("sections, expected", WRONG_TYPES, ids=lambda value: str(value)[:40])
def test_wrong_types_name_key_and_value(sections, expected):
    assert error_of(**sections) == expected


@pytest.mark.parametrize("path", [None, 5, [], ["a.jsonl", ""], ["a.jsonl", 3], ""])
def test_data_path_must_be_a_path_or_a_non_empty_list(path):
    assert error_of(data={"path": path}) == (f"rl_config.data.path ({path!r}) must be a jsonl path or a non-empty "
                                             "list of paths")


def test_data_path_is_required():
    assert error_of(data=None).startswith("rl_config.data.path (None) must be")


@pytest.mark.parametrize("run_config", [{}, {"rl_config": None}])
def test_missing_rl_config_is_an_error(run_config):
    with pytest.raises(ConfigError, match=r"^rl_config \(None\) must be set for run_mode grpo"):
        rl_config_from_run_config(run_config)


def test_rl_config_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"^rl_config \(\['data'\]\) must be a mapping$"):
        rl_config_from_run_config({"rl_config": ["data"]})


@pytest.mark.parametrize("dp_size", [0, -2, 1.0, True])
def test_dp_size_must_be_a_positive_integer(dp_size):
    with pytest.raises(ConfigError, match=r"^dp_size \(.*\) must be a positive integer$"):
        rl_config_from_run_config({"rl_config": {"data": {"path": "p.jsonl"}}}, dp_size=dp_size)


KL_RULE = f"must be one of {sorted(KL_KINDS)}, optionally with a '+' suffix"
VALUE_RULES = [
    (dict(actor={"clip_ratio_c": 1}), "rl_config.actor.clip_ratio_c (1.0) must be null (no dual clip) or > 1"),
    (dict(actor={"clip_ratio_c": 0.5}), "rl_config.actor.clip_ratio_c (0.5) must be null (no dual clip) or > 1"),
    (dict(actor={"clip_ratio_low": -0.1}), "rl_config.actor.clip_ratio_low (-0.1) must be >= 0"),
    (dict(actor={"clip_ratio": -0.2}), "rl_config.actor.clip_ratio_low (-0.2) must be >= 0"),
    (dict(actor={"kl_loss_coef": -1}), "rl_config.actor.kl_loss_coef (-1.0) must be >= 0"),
    (dict(actor={"ppo_epochs": 0}), "rl_config.actor.ppo_epochs (0) must be > 0"),
    (dict(actor={"kl_loss_type": "k4"}), f"rl_config.actor.kl_loss_type ('k4') {KL_RULE}"),
    (dict(actor={"kl_loss_type": "k4+"}), f"rl_config.actor.kl_loss_type ('k4+') {KL_RULE}"),
    (dict(actor={"kl_loss_type": "+"}), f"rl_config.actor.kl_loss_type ('+') {KL_RULE}"),
    (dict(actor={"kl_loss_type": "k3++"}), f"rl_config.actor.kl_loss_type ('k3++') {KL_RULE}"),
    (dict(actor={"loss_agg_mode": "mean"}),
     f"rl_config.actor.loss_agg_mode ('mean') must be one of {list(LOSS_AGG_MODES)}"),
    (dict(rollout={"temperature": 0}), "rl_config.rollout.temperature (0.0) must be > 0"),
    (dict(rollout={"temperature": -1.0}), "rl_config.rollout.temperature (-1.0) must be > 0"),
    (dict(rollout={"top_p": 1.5}), "rl_config.rollout.top_p (1.5) must be in [0, 1] (1: off)"),
    (dict(rollout={"top_p": -0.1}), "rl_config.rollout.top_p (-0.1) must be in [0, 1] (1: off)"),
    (dict(rollout={"top_k": -2}), "rl_config.rollout.top_k (-2) must be >= -1 (0 or -1: off)"),
    (dict(rollout={"n": 0}), "rl_config.rollout.n (0) must be > 0"),
    (dict(rollout={"max_response_length": 0}), "rl_config.rollout.max_response_length (0) must be > 0"),
    (dict(rollout={"decode_batch_size": 0}), "rl_config.rollout.decode_batch_size (0) must be > 0"),
    (dict(data={"path": "p.jsonl", "max_prompt_length": 0}), "rl_config.data.max_prompt_length (0) must be > 0"),
    (dict(reward={"time_limit": 0}), "rl_config.reward.time_limit (0.0) must be > 0 seconds"),
    (dict(reward={"max_reward_error_frac": 1.5}), "rl_config.reward.max_reward_error_frac (1.5) must be in [0, 1]"),
    (dict(dynamic_sampling={"max_num_gen_batches": -1}),
     "rl_config.dynamic_sampling.max_num_gen_batches (-1) must be >= 0 (0: unlimited)"),
]


@pytest.mark.parametrize("sections, expected", VALUE_RULES, ids=lambda value: str(value)[:40])
def test_value_rules_name_key_value_and_rule(sections, expected):
    assert error_of(**sections) == expected


GROUPS_RULE = "groups are never split across ranks"
BATCH_LAYOUT_RULES = [
    (1, dict(rollout={"prompts_per_step": 16}, actor={"ppo_mini_batch_size": 6}),
     "rl_config.rollout.prompts_per_step (16) must be divisible by rl_config.actor.ppo_mini_batch_size (6)"),
    (1, dict(rollout={"prompts_per_step": 16}, actor={"ppo_mini_batch_size": 32}),
     "rl_config.rollout.prompts_per_step (16) must be divisible by rl_config.actor.ppo_mini_batch_size (32)"),
    (1, dict(actor={"ppo_mini_batch_size": 0}), "rl_config.actor.ppo_mini_batch_size (0) must be > 0"),
    (4, dict(rollout={"prompts_per_step": 6}),
     f"rl_config.rollout.prompts_per_step (6) must be divisible by the data-parallel size (4): {GROUPS_RULE}"),
    (4, dict(rollout={"prompts_per_step": 8}, actor={"ppo_mini_batch_size": 2}),
     f"rl_config.actor.ppo_mini_batch_size (2) must be divisible by the data-parallel size (4): {GROUPS_RULE}"),
    (2, dict(rollout={"prompts_per_step": 8, "n": 3}, actor={"ppo_micro_batch_size_per_device": 5}),
     "rl_config.actor.ppo_micro_batch_size_per_device (5) must divide the per-device mini-batch share "
     "(8 prompts x 3 samples / 2 devices = 12 samples)"),
    (2, dict(rollout={"prompts_per_step": 8, "n": 3}, actor={"ppo_micro_batch_size_per_device": 24}),
     "rl_config.actor.ppo_micro_batch_size_per_device (24) must divide the per-device mini-batch share "
     "(8 prompts x 3 samples / 2 devices = 12 samples)"),
    (1, dict(actor={"ppo_micro_batch_size_per_device": 0}),
     "rl_config.actor.ppo_micro_batch_size_per_device (0) must be > 0"),
    (1, dict(rollout={"prompts_per_step": 16}, dynamic_sampling={"enable": True, "over_sampling_batch_size": 8}),
     "rl_config.dynamic_sampling.over_sampling_batch_size (8) must be >= rl_config.rollout.prompts_per_step (16)"),
    (4, dict(rollout={"prompts_per_step": 16}, dynamic_sampling={"over_sampling_batch_size": 18}),
     f"rl_config.dynamic_sampling.over_sampling_batch_size (18) must be divisible by the data-parallel size (4): "
     f"{GROUPS_RULE}"),
]


@pytest.mark.parametrize("dp_size, sections, expected", BATCH_LAYOUT_RULES, ids=lambda value: str(value)[:40])
def test_batch_layout_rules_name_key_value_and_sizes(dp_size, sections, expected):
    assert error_of(dp_size=dp_size, **sections) == expected


# ---------------------------------------------------------------------------------------------------
# defaults against verl 0.9.1's own configuration

# (our section, key) -> verl's key in the flattened trainer YAML, where the docstring maps one to the other
SAME_DEFAULT_AS_VERL = [
    (("data", "prompt_key"), "data.prompt_key"),
    (("data", "max_prompt_length"), "data.max_prompt_length"),
    (("data", "shuffle"), "data.shuffle"),
    (("data", "seed"), "data.seed"),
    (("rollout", "temperature"), "actor_rollout_ref.rollout.temperature"),
    (("rollout", "top_k"), "actor_rollout_ref.rollout.top_k"),
    (("rollout", "top_p"), "actor_rollout_ref.rollout.top_p"),
    (("actor", "ppo_epochs"), "actor_rollout_ref.actor.ppo_epochs"),
    (("actor", "clip_ratio"), "actor_rollout_ref.actor.clip_ratio"),
    (("actor", "clip_ratio_low"), "actor_rollout_ref.actor.clip_ratio_low"),
    (("actor", "clip_ratio_high"), "actor_rollout_ref.actor.clip_ratio_high"),
    (("actor", "loss_agg_mode"), "actor_rollout_ref.actor.loss_agg_mode"),
    (("actor", "entropy_coeff"), "actor_rollout_ref.actor.entropy_coeff"),
    (("actor", "use_kl_loss"), "actor_rollout_ref.actor.use_kl_loss"),
    (("actor", "kl_loss_coef"), "actor_rollout_ref.actor.kl_loss_coef"),
    (("actor", "kl_loss_type"), "actor_rollout_ref.actor.kl_loss_type"),
    (("actor", "norm_adv_by_std_in_grpo"), "algorithm.norm_adv_by_std_in_grpo"),
    (("dynamic_sampling", "enable"), "algorithm.filter_groups.enable"),
    (("dynamic_sampling", "over_sampling_batch_size"), "data.gen_batch_size"),
]
# Defaults chosen differently on purpose: (our section, key), ours after reading a minimal section, verl's key, verl's
DIFFERENT_DEFAULT_FROM_VERL = {
    "dual clip off, as slime's --eps-clip-c": (("actor", "clip_ratio_c"), None,
                                               "actor_rollout_ref.actor.clip_ratio_c", 3.0),
    "a GRPO group needs n > 1": (("rollout", "n"), 8, "actor_rollout_ref.rollout.n", 1),
    "a small run's batch": (("rollout", "prompts_per_step"), 16, "data.train_batch_size", 1024),
    "a small run's response": (("rollout", "max_response_length"), 256, "data.max_response_length", 512),
    "one update per rollout": (("actor", "ppo_mini_batch_size"), 16, "actor_rollout_ref.actor.ppo_mini_batch_size",
                               256),
    "bounded regeneration": (("dynamic_sampling", "max_num_gen_batches"), 10,
                             "algorithm.filter_groups.max_num_gen_batches", 0),
}


@pytest.fixture(scope="module")
def verl_defaults():
    """verl's flattened trainer YAML, read without importing verl (its __init__ needs ray)."""
    spec = importlib.util.find_spec("verl")
    if spec is None:
        require_reference("verl")   # a failure in strict runs, a skip with the reason otherwise
    assert importlib.metadata.version("verl") == VERL_VERSION, "the mapping table documents verl " + VERL_VERSION
    path = Path(spec.submodule_search_locations[0]).joinpath(*VERL_TRAINER_YAML)
    assert path.is_file(), f"verl {VERL_VERSION} should ship {path}"
    return yaml.safe_load(path.read_text())


def verl_value(defaults, dotted):
    for part in dotted.split("."):
        defaults = defaults[part]
    return defaults


def our_default(section, key):
    """Our value after reading a minimal section (null defaults resolved); `clip_ratio` is read as its low side."""
    config = getattr(read(), section)
    return config.clip_ratio_low if key == "clip_ratio" else getattr(config, key)


def our_declared_default(section, key):
    """The dataclass default as declared, before the reader resolves nulls."""
    fields = {field.name: field.default for field in dataclasses.fields(SECTION_CLASSES[section])}
    return fields["clip_ratio_low" if key == "clip_ratio" else key]


@pytest.mark.parametrize("ours, verl_key", SAME_DEFAULT_AS_VERL, ids=lambda value: str(value))
def test_verl_default_read_by_us_is_our_default(verl_defaults, ours, verl_key):
    """verl's default value, written in our section, reads into the same config as leaving the key out."""
    section, key = ours
    value = verl_value(verl_defaults, verl_key)
    assert not (isinstance(value, str) and value.startswith("${")), f"{verl_key} is an interpolation: {value}"
    sections = {"data": {"path": "prompts.jsonl"}}
    sections.setdefault(section, {})[key] = value
    assert read(**sections) == read()
    assert our_declared_default(section, key) == (0 if key == "top_k" and value == -1 else value)


@pytest.mark.parametrize("reason", DIFFERENT_DEFAULT_FROM_VERL)
def test_defaults_that_differ_from_verl_on_purpose(verl_defaults, reason):
    (section, key), ours, verl_key, verls = DIFFERENT_DEFAULT_FROM_VERL[reason]
    assert (our_default(section, key), verl_value(verl_defaults, verl_key)) == (ours, verls)


def test_verl_clip_ratio_c_reads_as_its_dual_clip(verl_defaults):
    """Writing verl's default clip_ratio_c turns on the same dual clip verl runs by default."""
    value = verl_value(verl_defaults, "actor_rollout_ref.actor.clip_ratio_c")
    assert read(actor={"clip_ratio_c": value}).actor.clip_ratio_c == 3.0


def test_verl_micro_batch_name_is_accepted_once():
    section = {"data": {"path": "p.jsonl"}, "rollout": {"n": 2, "prompts_per_step": 4},
               "actor": {"ppo_micro_batch_size_per_gpu": 2}}
    assert rl_config_from_run_config({"rl_config": section}).actor.ppo_micro_batch_size_per_device == 2
    section["actor"]["ppo_micro_batch_size_per_device"] = 4
    with pytest.raises(ConfigError, match=r"ppo_micro_batch_size_per_gpu \(2\) and ppo_micro_batch_size_per_device"):
        rl_config_from_run_config({"rl_config": section})
