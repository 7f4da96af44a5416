"""GRPO prompts: jsonl files to token ids (plain and through a chat template), and the prompt sampler's order.

Plain prompts use the arithmetic demo's character tokenizer (one id per character, so expected ids are written
out by hand). The chat-template path is checked against transformers' `apply_chat_template(...,
add_generation_prompt=True)` with the real DeepSeek-V3 tokenizer and template from ../shared.
"""
import json
import re

import pytest

from conftest import require_reference
from mindpretrain.data.chat_template import ChatTemplate, load_chat_template
from mindpretrain.data.tokenizer import load_tokenizer
from mindpretrain.rl.arithmetic_task import vocabulary, write_task_tokenizer
from mindpretrain.rl.config import RLDataConfig
from mindpretrain.rl.prompts import PromptSampler, load_prompts, rank_slice
from mindpretrain.validation import ConfigError

VOCAB = vocabulary()
BOS = VOCAB["<s>"]


@pytest.fixture(scope="module")
def task_tokenizer(tmp_path_factory):
    return load_tokenizer("HFTokenizer", write_task_tokenizer(str(tmp_path_factory.mktemp("task_tokenizer"))))


def char_ids(text):
    return [VOCAB[char] for char in text]


def write_lines(path, lines):
    """A jsonl file: dicts are dumped as JSON, strings written as they are (blank and malformed lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def data_config(*paths, **overrides):
    values = dict(apply_chat_template=False, max_prompt_length=64)
    values.update(overrides)
    return RLDataConfig(paths=tuple(str(path) for path in paths), **values)


# ------------------------------------------------------------------------------------------ plain prompts


def test_plain_prompts_are_bos_and_their_tokens_with_labels_as_strings(task_tokenizer, tmp_path):
    first = write_lines(tmp_path / "a.jsonl", [{"prompt": "3+4=", "label": "7"}, "", "   ",
                                               {"prompt": "1+1=", "label": 2, "extra": "ignored"}])
    second = write_lines(tmp_path / "b.jsonl", [{"question": "0+0=", "answer": 0.5}])
    prompts = load_prompts(data_config(first), task_tokenizer)
    assert [tuple(record) for record in prompts.records] == [
        (0, [BOS] + char_ids("3+4="), "3+4=", "7", f"{first}:1"),
        (1, [BOS] + char_ids("1+1="), "1+1=", "2", f"{first}:4")]
    assert prompts.filtered_overlong == 0 and prompts.sources == (first,) and len(prompts) == 2
    keyed = load_prompts(data_config(second, prompt_key="question", label_key="answer"), task_tokenizer)
    assert keyed.records[0].label == "0.5" and keyed.records[0].source == f"{second}:1"


def test_overlong_prompts_are_dropped_counted_and_indices_renumbered(task_tokenizer, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "1+1=", "label": "2"}, {"prompt": "11+11=", "label": "22"},
                                              {"prompt": "2+2=", "label": "4"}])
    prompts = load_prompts(data_config(path, max_prompt_length=5), task_tokenizer)  # BOS + 4 characters fit
    assert [(record.index, record.text, record.source) for record in prompts.records] == [
        (0, "1+1=", f"{path}:1"), (1, "2+2=", f"{path}:3")]
    assert prompts.filtered_overlong == 1
    assert load_prompts(data_config(path, max_prompt_length=7), task_tokenizer).filtered_overlong == 0


def test_zero_prompts_left_says_how_many_were_read_and_too_long(task_tokenizer, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "11+11=", "label": "22"}, {"prompt": "1+1=", "label": "2"}])
    with pytest.raises(ConfigError, match=r"2 read, 2 longer than rl_config\.data\.max_prompt_length \(3\)"):
        load_prompts(data_config(path, max_prompt_length=3), task_tokenizer)
    empty = write_lines(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ConfigError, match="0 read, 0 longer"):
        load_prompts(data_config(empty), task_tokenizer)


def test_missing_file_names_the_key_and_the_path(task_tokenizer, tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [{"prompt": "1+1=", "label": "2"}])
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(ConfigError, match=r"rl_config\.data\.path \('.*nowhere\.jsonl'\) is not a file"):
        load_prompts(data_config(good, missing), task_tokenizer)


MALFORMED = {
    "not_json": ('{"prompt": "1+1=", "label": ', "not JSON"),
    "not_object": ('["1+1=", "2"]', "expected a JSON object, got list"),
    "missing_prompt": ({"label": "2"}, "the prompt key 'prompt' is missing"),
    "empty_prompt": ({"prompt": "", "label": "2"}, "'prompt' .* must be a non-empty string or a list"),
    "number_prompt": ({"prompt": 3, "label": "2"}, "'prompt' .* must be a non-empty string or a list"),
    "empty_messages": ({"prompt": [], "label": "2"}, "empty message list"),
    "message_not_object": ({"prompt": ["hi"], "label": "2"}, "message 0 .* must be an object"),
    "message_without_role": ({"prompt": [{"content": "hi"}], "label": "2"}, "message 0 .* 'role'"),
    "message_content_not_string": ({"prompt": [{"role": "user", "content": None}], "label": "2"},
                                   "message 0 .* string 'content'"),
    "missing_label": ({"prompt": "1+1="}, "the label key 'label' is missing"),
    "empty_label": ({"prompt": "1+1=", "label": ""}, "'label' .* must be a non-empty string or a number"),
    "bool_label": ({"prompt": "1+1=", "label": True}, "'label' .* must be a non-empty string or a number"),
    "messages_without_template": ({"prompt": [{"role": "user", "content": "1+1="}], "label": "2"},
                                  "message list, which needs a chat template"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_line_names_file_and_line(task_tokenizer, tmp_path, kind):
    line, problem = MALFORMED[kind]
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "1+1=", "label": "2"}, "", line,
                                              {"prompt": "2+2=", "label": "4"}])
    with pytest.raises(ConfigError) as error:
        load_prompts(data_config(path), task_tokenizer)
    assert f"{path}:3: " in str(error.value)
    assert re.search(problem, str(error.value)), str(error.value)


def test_every_line_is_checked_before_any_prompt_is_tokenized(tmp_path):
    class CountingTokenizer:
        bos_id, calls = 1, 0

        def encode(self, text):
            CountingTokenizer.calls += 1
            return [2] * len(text)

    first = write_lines(tmp_path / "a.jsonl", [{"prompt": "fine", "label": "1"}] * 3)
    second = write_lines(tmp_path / "b.jsonl", [{"prompt": "fine", "label": "1"}, "oops"])
    with pytest.raises(ConfigError, match=r"b\.jsonl:2: not JSON"):
        load_prompts(data_config(first, second), CountingTokenizer())
    assert CountingTokenizer.calls == 0


# ------------------------------------------------------------------------------------------ chat templates


# The task vocabulary has no letters for role names: users are written 'b', others 'd'.
TOY_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ 'b' if m['role'] == 'user' else 'd' }}{{ m['content'] }}"
                "{% endfor %}{% if add_generation_prompt %}={% endif %}")


def test_a_chat_template_renders_with_the_generation_prompt_and_one_bos(task_tokenizer, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "1+1", "label": "2"},
                                              {"prompt": [{"role": "system", "content": "0"},
                                                          {"role": "user", "content": "2+2"}], "label": "4"}])
    config = data_config(path, apply_chat_template=True)
    records = load_prompts(config, task_tokenizer, ChatTemplate(TOY_TEMPLATE, "toy")).records
    assert [record.text for record in records] == ["<s>b1+1=", "<s>d0b2+2="]
    assert [record.ids for record in records] == [[BOS] + char_ids("b1+1="), [BOS] + char_ids("d0b2+2=")]
    without_bos = load_prompts(config, task_tokenizer, TOY_TEMPLATE.replace("{{ bos_token }}", "")).records
    assert without_bos[0].text == "b1+1=" and without_bos[0].ids == [BOS] + char_ids("b1+1=")
    single = write_lines(tmp_path / "s.jsonl", [{"prompt": "1+1=", "label": "2"}])
    ignored = load_prompts(data_config(single, apply_chat_template=False), task_tokenizer, TOY_TEMPLATE).records
    assert ignored[0].text == "1+1=" and ignored[0].ids == [BOS] + char_ids("1+1=")


def test_a_template_error_names_the_line(task_tokenizer, tmp_path):
    template = "{% if messages[0]['content'] == 'no' %}{{ raise_exception('refused here') }}{% endif %}{{ bos_token }}"
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "yes", "label": "1"}, {"prompt": "no", "label": "1"}])
    with pytest.raises(ConfigError, match=r"p\.jsonl:2: the chat template refuses this prompt \(refused here\)"):
        load_prompts(data_config(path, apply_chat_template=True), task_tokenizer, template)


@pytest.fixture(scope="module")
def deepseek(deepseek_tokenizer_json):
    return load_tokenizer("HFTokenizer", deepseek_tokenizer_json), load_chat_template(str(deepseek_tokenizer_json))


def test_deepseek_v3_rendering_equals_transformers_apply_chat_template(deepseek, deepseek_tokenizer_json, tmp_path):
    transformers = require_reference("transformers")
    tokenizer, template = deepseek
    conversations = [[{"role": "user", "content": "What is 3+4? Put the answer in \\boxed{}."}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2=?"}]]
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": conversations[0][0]["content"], "label": 7},
                                              {"prompt": conversations[1], "label": "4"}])
    records = load_prompts(data_config(path, apply_chat_template=True), tokenizer, template).records
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(deepseek_tokenizer_json),
                                              bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
    for record, messages in zip(records, conversations):
        text = hf.apply_chat_template(messages, chat_template=template.text, add_generation_prompt=True,
                                      tokenize=False)
        assert record.text == text and text.endswith("<｜Assistant｜>")
        ids = hf.apply_chat_template(messages, chat_template=template.text, add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
        assert record.ids == list(ids)
        assert record.ids[0] == tokenizer.bos_id and record.ids.count(tokenizer.bos_id) == 1
    assert [record.label for record in records] == ["7", "4"]


# ------------------------------------------------------------------------------------------ the sampler


def drawn(sampler, batches):
    return [sampler.next_batch() for _ in range(batches)]


def test_each_epoch_deals_every_index_once_in_a_fresh_order():
    flat = sum(drawn(PromptSampler(10, 5, seed=3), 6), [])
    epochs = [flat[start:start + 10] for start in range(0, 30, 10)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3 and epochs[0] != list(range(10))


def test_batches_straddle_epoch_boundaries():
    sampler = PromptSampler(5, 3, seed=0, shuffle=False)
    assert drawn(sampler, 4) == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    assert sampler.state() == {"epoch": 2, "position": 2, "consumed": 12, "num_prompts": 5}
    shuffled = PromptSampler(5, 3, seed=1)
    flat = sum(drawn(shuffled, 5), [])   # 15 indices: exactly 3 epochs, the second batch straddles
    assert all(sorted(flat[start:start + 5]) == list(range(5)) for start in (0, 5, 10))
    assert drawn(PromptSampler(2, 5, seed=0, shuffle=False), 1) == [[0, 1, 0, 1, 0]]  # more per step than prompts


def test_the_seed_fixes_the_order():
    assert drawn(PromptSampler(50, 7, seed=11), 20) == drawn(PromptSampler(50, 7, seed=11), 20)
    assert drawn(PromptSampler(50, 7, seed=11), 20) != drawn(PromptSampler(50, 7, seed=12), 20)


def test_resuming_from_state_draws_what_the_uninterrupted_sampler_draws():
    uninterrupted = drawn(PromptSampler(7, 3, seed=5), 10)   # 30 indices: more than 4 epochs of 7
    for cut in range(10):
        first = PromptSampler(7, 3, seed=5)
        head = drawn(first, cut)
        state = json.loads(json.dumps(first.state()))
        resumed = PromptSampler.from_state(7, 3, 5, True, state)
        assert head + drawn(resumed, 10 - cut) == uninterrupted, cut
        assert resumed.state()["consumed"] == 30


def test_a_state_that_does_not_fit_is_refused():
    sampler = PromptSampler(7, 3, seed=5)
    drawn(sampler, 2)
    with pytest.raises(ConfigError, match="saved for 7 prompts, but the prompt set now has 8"):
        PromptSampler.from_state(8, 3, 5, True, sampler.state())
    with pytest.raises(ConfigError, match="consumed must be epoch x prompts"):
        PromptSampler.from_state(7, 3, 5, True, {"epoch": 1, "position": 2, "consumed": 3})
    with pytest.raises(ConfigError, match="must hold non-negative integers"):
        PromptSampler.from_state(7, 3, 5, True, {"epoch": 0, "position": 1})
    with pytest.raises(ConfigError, match=r"rl_config\.data\.seed \(None\)"):
        PromptSampler(7, 3, seed=None)


def test_rank_slice_gives_contiguous_whole_shares():
    batch = [9, 4, 7, 1, 0, 3, 8, 2]
    shares = [rank_slice(batch, rank, 4) for rank in range(4)]
    assert shares == [[9, 4], [7, 1], [0, 3], [8, 2]]
    assert rank_slice(batch, 0, 1) == batch
    with pytest.raises(ConfigError, match=r"prompt batch size \(8\) must be divisible by the data-parallel size \(3\)"):
        rank_slice(batch, 0, 3)
    with pytest.raises(ConfigError, match=r"dp_rank \(4\) must be in \[0, 4\)"):
        rank_slice(batch, 4, 4)
