"""The GRPO demo task: its character tokenizer, its prompts, and a format corpus that does not teach the answers.

Files are read back through the project's own loaders (`load_tokenizer`, `load_prompts`) and graded with the
deepscaler grader the demo's `rl_config.reward` uses.
"""
import collections
import json
import re

import pytest

from conftest import require_reference
from mindpretrain.data.tokenizer import load_tokenizer
from mindpretrain.rl import arithmetic_task
from mindpretrain.rl.arithmetic_task import (CHARACTERS, facts, main, write_format_corpus, write_prompts,
                                             write_task_tokenizer)
from mindpretrain.rl.config import RLDataConfig
from mindpretrain.rl.prompts import load_prompts
from mindpretrain.rl.rewards import math_reward, resolve_grader

CORPUS_LINE = re.compile(r"(\d)\+(\d)=\\boxed\{(\d+)\}")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return write_task_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return load_tokenizer("HFTokenizer", tokenizer_path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_tokenizer_is_small_character_level_and_round_trips(tokenizer):
    assert tokenizer.vocab_size == len(CHARACTERS) + 4 < 40
    backend = tokenizer.backend
    assert (tokenizer.bos_id, tokenizer.eod_id, tokenizer.pad_id) == tuple(
        backend.token_to_id(token) for token in ("<s>", "</s>", "<pad>"))
    for text in ["3+4=\\boxed{7}", "".join(CHARACTERS), " 10 - 2 = \\boxed{ 8 }", "0"]:
        ids = tokenizer.encode(text)
        assert len(ids) == len(text) and tokenizer.decode(ids) == text
    ids = tokenizer.encode("1+1=")
    assert len(set(ids)) == 3 and tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eod_id]) == "1+1="
    assert tokenizer.decode([tokenizer.bos_id] + ids, skip_special_tokens=False) == "<s>1+1="
    assert len({tokenizer.encode(char)[0] for char in CHARACTERS}) == len(CHARACTERS)


def test_transformers_reads_the_same_tokenizer(tokenizer, tokenizer_path):
    transformers = require_reference("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_path).rsplit("/", 1)[0])
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tokenizer.bos_id, tokenizer.eod_id,
                                                                  tokenizer.pad_id)
    assert hf.encode("2+3=\\boxed{5}", add_special_tokens=False) == tokenizer.encode("2+3=\\boxed{5}")


def test_prompts_are_addition_facts_with_their_sums(tmp_path, tokenizer):
    path = write_prompts(str(tmp_path / "prompts.jsonl"), 100, seed=0)
    rows = read_jsonl(path)
    assert len(rows) == 100 and all(set(row) == {"prompt", "label"} for row in rows)
    operands = [tuple(int(x) for x in re.fullmatch(r"(\d)\+(\d)=", row["prompt"]).groups()) for row in rows]
    assert [row["label"] for row in rows] == [str(a + b) for a, b in operands]
    assert collections.Counter(operands) == {fact: 4 for fact in facts()}   # all 25 facts, equally often
    assert rows == read_jsonl(write_prompts(str(tmp_path / "again.jsonl"), 100, seed=0))
    assert rows != read_jsonl(write_prompts(str(tmp_path / "other.jsonl"), 100, seed=1))
    config = RLDataConfig(paths=(path,), apply_chat_template=False, max_prompt_length=8)
    records = load_prompts(config, tokenizer).records
    assert [record.ids for record in records[:2]] == [[tokenizer.bos_id] + tokenizer.encode(row["prompt"])
                                                      for row in rows[:2]]
    assert [record.label for record in records] == [row["label"] for row in rows]


def test_corpus_is_in_format_but_its_answers_are_chance(tmp_path):
    rows = read_jsonl(write_format_corpus(str(tmp_path / "corpus.jsonl"), 2000, seed=0))
    matches = [CORPUS_LINE.fullmatch(row["text"]) for row in rows]
    assert all(matches) and all(set(row) == {"text"} for row in rows)
    a, b, given = ([int(match.group(g)) for match in matches] for g in (1, 2, 3))
    accuracy = sum(x + y == s for x, y, s in zip(a, b, given)) / len(rows)
    assert 0.05 < accuracy < 0.2   # 1 in 9 by chance
    assert set(given) == set(range(9)) and max(collections.Counter(given).values()) < 2000 / 9 * 1.3
    assert set(zip(a, b)) == set(facts())
    true_sums = [x + y for x, y in zip(a, b)]
    mean_given_when_true_is = {truth: sum(s for s, t in zip(given, true_sums) if t == truth)
                               / true_sums.count(truth) for truth in (0, 8)}
    assert abs(mean_given_when_true_is[0] - mean_given_when_true_is[8]) < 1.0   # no dependence on the truth


def test_the_deepscaler_grader_scores_the_corpus_format(tmp_path):
    assert resolve_grader("deepscaler") is math_reward
    assert math_reward("\\boxed{7}", "7") == 1.0
    assert math_reward("\\boxed{6}", "7") == 0.0
    assert math_reward("7", "7") == 0.0   # no box, no reward: the format is what the corpus teaches
    rows = read_jsonl(write_format_corpus(str(tmp_path / "corpus.jsonl"), 40, seed=3))
    for row in rows:
        a, b, given = CORPUS_LINE.fullmatch(row["text"]).groups()
        response = row["text"].split("=", 1)[1]
        assert math_reward(response, str(int(a) + int(b))) == float(int(given) == int(a) + int(b))


def test_main_writes_the_demo_files(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "demo"), "--prompts", "30", "--corpus", "50", "--seed", "7"]) == 0
    printed = capsys.readouterr().out.splitlines()
    demo = tmp_path / "demo"
    expected = [demo / "tokenizer" / "tokenizer.json", demo / "prompts.jsonl", demo / "format_corpus.jsonl"]
    assert len(printed) == 3 and all(str(path) in line for path, line in zip(expected, printed))
    assert (demo / "tokenizer" / "tokenizer_config.json").is_file()
    assert len(read_jsonl(expected[1])) == 30 and len(read_jsonl(expected[2])) == 50
    assert load_tokenizer("HFTokenizer", demo / "tokenizer").vocab_size == len(CHARACTERS) + 4
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(tmp_path / "bad"), "--prompts", "0"])
    assert exit_info.value.code == 2 and "--prompts (0) must be a positive" in capsys.readouterr().err


def test_a_wider_operand_range_gives_more_facts(tmp_path):
    rows = read_jsonl(arithmetic_task.write_prompts(str(tmp_path / "p.jsonl"), 100, seed=0, max_operand=9))
    assert {row["prompt"] for row in rows} == {f"{a}+{b}=" for a, b in facts(9)}
    assert max(int(row["label"]) for row in rows) == 18
