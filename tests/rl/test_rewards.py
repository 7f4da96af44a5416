"""The math graders and the RewardRunner.

The string side is compared with verl's own `verl/utils/reward_score/math_reward.py` (the Hendrycks
MATH normalisation and boxed-answer extraction DeepScaleR also uses), loaded from the installed verl
wheel as a stand-alone file (it imports nothing, so verl's package import chain is not needed). The
rest are golden cases, and failure modes of real child processes (raise, NaN, hang, busy loop).
"""
import importlib.util
import math
import os
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from conftest import require_reference
from mindpretrain.rl import rewards
from mindpretrain.rl.rewards import RewardError, RewardRunner, extract_answer, math_reward
from mindpretrain.validation import ConfigError

HANGING_TRUTH, HANGING_ANSWER = "((x+1)^9*(y+2)^9-1)^9", "((x+2)^9*(y+1)^9-1)^9"  # sympy.simplify: minutes


@pytest.fixture(scope="module")
def verl_math():
    """verl's math_reward.py, executed on its own."""
    spec = importlib.util.find_spec("verl")
    if spec is None:
        require_reference("verl")
    path = os.path.join(os.path.dirname(spec.origin), "utils", "reward_score", "math_reward.py")
    module_spec = importlib.util.spec_from_file_location("verl_math_reward_for_test", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graders(tmp_path_factory):
    """A module of test graders importable by the runner's child process (module:function)."""
    folder = tmp_path_factory.mktemp("graders")
    (folder / "graders_for_test.py").write_text(textwrap.dedent("""
        import math, time

        def exact(response, ground_truth, **kwargs):
            print("graders may print; it must not disturb the reply stream")
            return float(response.strip() == str(ground_truth))

        def by_response(response, ground_truth, **kwargs):
            if response == "raise":
                raise ValueError("grader exploded")
            if response == "nan":
                return math.nan
            if response == "text":
                return "1.0"
            if response == "sleep":
                time.sleep(600)
            if response == "spin":
                while True:
                    pass
            return 1.0

        def sees_extra_info(response, ground_truth, extra_info=None):
            return float(extra_info["weight"])
    """))
    sys.path.insert(0, str(folder))
    yield "graders_for_test"
    sys.path.remove(str(folder))


# ---------------------------------------------------------------------------------------------------
# extraction and string normalisation


BOXED_CASES = {
    r"so \boxed{\frac{1}{2}}.": r"\frac{1}{2}",
    r"\boxed{a} then \boxed{\sqrt{\frac{3}{4}}}": r"\sqrt{\frac{3}{4}}",
    r"The answer is \boxed 5": "5",
    r"$\boxed 12$ done": "12",
    r"\fbox{7}": "7",
    r"unclosed \boxed{3": None,
    r"no box at all": None,
}


@pytest.mark.parametrize("text", sorted(BOXED_CASES))
def test_last_boxed_content_matches_verl(verl_math, text):
    assert rewards.last_boxed_content(text) == BOXED_CASES[text]
    boxed = verl_math.last_boxed_only_string(text)
    if boxed is not None and boxed.startswith("\\fbox"):
        return  # verl finds the \fbox but its remove_boxed only unwraps \boxed (it asserts)
    assert rewards.last_boxed_content(text) == (None if boxed is None else verl_math.remove_boxed(boxed))


def test_the_answer_is_the_last_box_after_the_think_block():
    assert extract_answer(r"<think>maybe \boxed{3}</think> The answer is \boxed{4}.") == "4"
    assert extract_answer(r"<think>\boxed{3}</think> I am not sure.") is None
    assert extract_answer(r"no think block, \boxed{7}") == "7"
    assert extract_answer(r"prompt opened it</think> \boxed{8}") == "8"  # R1 templates put <think> in the prompt
    assert extract_answer(r"<think> ran out of tokens \boxed{9}") is None


NORMALISATION_CASES = [r"\frac12", "0.5", r"\dfrac{1}{2}", "1/2", r"\left( 3, 4 \right)", r"x = 5", r"50\%",
                       r"\sqrt3", r"90^\circ", r"10\text{ cm}", r".5", r"\$4.50", r"\frac{1}{72}", r"\tfrac3{4}",
                       r"k = \frac{a}{b}", "2 \\! 000", "12/05"]


@pytest.mark.parametrize("answer", NORMALISATION_CASES)
def test_strip_math_string_matches_verl(verl_math, answer):
    assert rewards.strip_math_string(answer) == verl_math.strip_string(answer)


@pytest.mark.parametrize("response, truth", [(r"\boxed{\frac12}", "0.5"), (r"\boxed{0.5}", r"\frac{1}{2}"),
                                             (r"\boxed{3}", "4"), (r"\boxed{x=5}", "5"),
                                             (r"\boxed{\dfrac{3}{4}}", "3/4"), (r"\boxed{10\%}", "10")])
def test_string_grading_agrees_with_verl_compute_score(verl_math, response, truth):
    assert math_reward(response, truth) == verl_math.compute_score(response, truth)


# ---------------------------------------------------------------------------------------------------
# golden grading cases, with sympy


GOLDEN = [
    (r"<think>...</think> \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac12", 1.0),
    (r"\boxed 5", "5", 1.0),
    (r"<think>\boxed{5}</think>so it is \boxed{6}", "5", 0.0),
    (r"<think>\boxed{5}", "5", 0.0),
    (r"\boxed{x^{2}+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2", 1.0),
    (r"\boxed{(1, 2)}", "(1,2)", 1.0),
    (r"\boxed{(2, 1)}", "(1,2)", 0.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{4.0}", "4", 1.0),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 0.0),  # DeepScaleR: unreduced fractions do not count
    (r"\boxed{3}", ["4", r"\boxed{3}"], 1.0),  # any of several ground truths, boxed or not
    (r"\boxed{3}", 3, 1.0),
    (r"\boxed{7}", "8", 0.0),
]


@pytest.mark.parametrize("response, truth, expected", GOLDEN)
def test_math_reward_golden_cases(response, truth, expected):
    assert math_reward(response, truth) == expected


def test_a_sympy_hang_is_stopped_by_its_time_limit():
    worker = rewards._sympy_worker()
    worker.start()
    pid = worker.pid
    start = time.monotonic()
    assert not rewards.grade_answer_sympy(HANGING_ANSWER, HANGING_TRUTH, timeout=1.0)
    assert time.monotonic() - start < 10.0
    assert not psutil.pid_exists(pid)  # killed (and reaped), not left computing
    assert rewards.grade_answer_sympy(r"2\sqrt{2}", r"\sqrt{8}")  # a fresh sympy process takes over
    assert worker.pid != pid


def test_math_verify_grader_when_installed():
    require_reference("math_verify")
    grade = rewards.math_verify_reward
    assert grade(r"<think>x</think> \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert grade(r"\boxed{0.5}", r"\frac12") == 1.0
    assert grade(r"\boxed{3}", "4") == 0.0
    assert grade(r"<think> \boxed{3}", "3") == 0.0


def test_math_verify_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(ImportError, match="pip install math-verify"):
        rewards.math_verify_reward(r"\boxed{1}", "1")


# ---------------------------------------------------------------------------------------------------
# the runner


def test_runner_scores_with_a_custom_grader(graders):
    with RewardRunner(f"{graders}:exact", time_limit=5.0) as runner:
        batch = runner.score(["a", "b", " c "], ["a", "x", "c"])
    np.testing.assert_array_equal(batch.scores, np.array([1, 0, 1], np.float32))
    assert batch.scores.dtype == np.float32 and batch.failures == 0


def test_runner_passes_extra_info(graders):
    with RewardRunner(f"{graders}:sees_extra_info", time_limit=5.0) as runner:
        batch = runner.score(["a", "b"], ["", ""], extra_infos=[{"weight": 0.25}, {"weight": 2}])
    np.testing.assert_array_equal(batch.scores, [0.25, 2.0])


def test_raising_nan_and_hanging_graders_score_on_error_and_are_counted(graders):
    responses = ["ok", "raise", "nan", "text", "sleep", "ok", "spin", "ok"]
    start = time.monotonic()
    with RewardRunner(f"{graders}:by_response", time_limit=1.0, on_error=-1.0, max_reward_error_frac=0.7) as runner:
        batch = runner.score(responses, [""] * len(responses))
        assert runner.total_scored == 8 and runner.total_failed == 5
    assert time.monotonic() - start < 30.0
    np.testing.assert_array_equal(batch.scores, [1, -1, -1, -1, -1, 1, -1, 1])
    np.testing.assert_array_equal(batch.failed, [False, True, True, True, True, False, True, False])
    assert (batch.exceptions, batch.non_finite, batch.timeouts) == (1, 2, 2)
    assert "ValueError: grader exploded" in batch.first_error


def test_too_many_failures_raise_a_clear_error(graders):
    with RewardRunner(f"{graders}:by_response", time_limit=5.0, max_reward_error_frac=0.25) as runner:
        assert runner.score(["raise", "ok", "ok", "ok"], [""] * 4).failures == 1  # 25% is allowed
        with pytest.raises(RewardError, match=r"2 of 4 rewards failed.*max_reward_error_frac \(0.25\)"):
            runner.score(["raise", "nan", "ok", "ok"], [""] * 4)


def test_a_grader_killed_for_its_time_limit_takes_its_sympy_process_along():
    with RewardRunner("deepscaler", time_limit=3.0, grader_kwargs={"sympy_timeout": 300.0},
                      max_reward_error_frac=1.0) as runner:
        runner._worker.start()
        grader = psutil.Process(runner._worker.pid)
        sympy_processes = grader.children()
        assert len(sympy_processes) == 1  # started before the first sample, not charged to it
        batch = runner.score([rf"\boxed{{{HANGING_ANSWER}}}", r"\boxed{\frac12}"], [HANGING_TRUTH, "0.5"])
        np.testing.assert_array_equal(batch.scores, [0.0, 1.0])
        assert batch.timeouts == 1
        _, alive = psutil.wait_procs(sympy_processes + [grader], timeout=10)
        assert not alive


def test_deepscaler_runner_golden_batch():
    responses = [case[0] for case in GOLDEN]
    with RewardRunner("math", time_limit=30.0) as runner:
        batch = runner.score(responses, [case[1] for case in GOLDEN])
    np.testing.assert_array_equal(batch.scores, [case[2] for case in GOLDEN])


@pytest.mark.parametrize("kwargs, key", [(dict(grader="nope"), "reward.grader"),
                                         (dict(grader="no_such_module_here:f"), "reward.grader"),
                                         (dict(time_limit=0), "reward.time_limit"),
                                         (dict(on_error=math.nan), "reward.on_error"),
                                         (dict(max_reward_error_frac=1.5), "reward.max_reward_error_frac")])
def test_runner_settings_are_checked(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        RewardRunner(**kwargs)


def test_mismatched_lengths_are_rejected(graders):
    with RewardRunner(f"{graders}:exact") as runner:
        with pytest.raises(ConfigError, match="ground_truths"):
            runner.score(["a", "b"], ["a"])
