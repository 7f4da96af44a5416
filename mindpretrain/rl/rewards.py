"""Rewards for GRPO: math answer graders and the `RewardRunner` that scores a batch safely.

Graders, chosen by name (`resolve_grader`):
- `deepscaler` (alias `math`): DeepScaleR's rule (`deepscaler/rewards/math_reward.py`): the answer is
  the last `\\boxed{}` after `</think>` (the whole response when there is no think block; none when a
  think block is left open), compared with the ground truth by the Hendrycks MATH string
  normalisation that verl's and DeepScaleR's math utilities share, then, failing that, by sympy
  equivalence (DeepScaleR's `grade_answer_sympy`) under a time limit.
- `math_verify`: HuggingFace's math-verify, as TRL's `accuracy_reward` calls it, when installed
  (optional, never a dependency).
- `module:function`: any importable `function(response, ground_truth, **kwargs) -> float`.

A grader may raise, hang or return NaN. The runner therefore calls it in a child process
(`_Worker`) under a per-sample time limit: a hang is ended by killing that process (no signals, so it
works from any thread and stops C-level loops too), and each failure scores `on_error` and is
counted; more than `max_reward_error_frac` failures in a batch raise `RewardError`. sympy's own
equivalence check runs the same way in a second child, so a pathological expression costs at most
`sympy_timeout` seconds and counts as "not shown equal" (DeepScaleR's answer when sympy fails).
sympy is imported only in that child.
"""
import atexit
import dataclasses
import importlib
import importlib.util
import math
import os
import pickle
import re
import select
import struct
import subprocess
import sys
import threading
import time
import weakref

import numpy as np

from mindpretrain.utils.logging import get_logger
from mindpretrain.validation import ConfigError, require

logger = get_logger("rl")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BUILTIN_GRADERS = ("deepscaler", "math", "math_verify")
DEFAULT_SYMPY_TIMEOUT = 5.0
_STARTUP_TIMEOUT = 120.0  # a cold interpreter importing sympy on a busy machine
_MODULE = "mindpretrain.rl.rewards"  # what the worker runs (`python -m`), also when this file is __main__
_LATEX_COMMAND = re.compile(r"\\([a-zA-Z]+)")


# ---------------------------------------------------------------------------------------------------
# Answer extraction


def final_answer_text(response):
    """The part of a response that holds the answer: after the last `</think>`; the whole response
    when there is no think block; None when `<think>` was opened but never closed (the model ran out
    of tokens while reasoning, DeepScaleR scores that as a format error)."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in response:
        return None
    return response


def last_boxed_content(text):
    """What the last `\\boxed{...}` (or `\\fbox{...}`) holds, braces matched; `\\boxed 5` gives `5`
    (verl's rule: up to the next `$`). None when there is no complete box."""
    start = text.rfind("\\boxed")
    command = "\\boxed"
    if start < 0:
        start, command = text.rfind("\\fbox"), "\\fbox"
        if start < 0:
            return None
    rest = text[start + len(command):]
    if rest.startswith(" "):
        return rest.split("$", 1)[0].strip() or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for index, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:index]
    return None


def extract_answer(response):
    """The boxed answer of a model response under the think-block rule above, or None."""
    text = final_answer_text(response)
    return None if text is None else last_boxed_content(text)


def ground_truth_answers(ground_truth):
    """Acceptable answers: a string, a number or a list of them; a boxed one is unboxed."""
    truths = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    answers = []
    for truth in truths:
        truth = str(truth)
        answers.append(last_boxed_content(truth) if "\\boxed" in truth else truth)
    return [answer for answer in answers if answer is not None]


# ---------------------------------------------------------------------------------------------------
# Hendrycks MATH string normalisation (verl's math_reward.strip_string, DeepScaleR's mathd)


def _fix_fracs(string):
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`."""
    pieces = string.split("\\frac")
    fixed = pieces[0]
    for piece in pieces[1:]:
        fixed += "\\frac"
        if piece.startswith("{"):
            fixed += piece
        elif len(piece) < 2:
            return string
        elif piece[1] != "{":
            fixed += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            fixed += "{" + piece[0] + "}" + piece[1:]
    return fixed


def _fix_a_slash_b(string):
    """`3/4` (integers only) -> `\\frac{3}{4}`."""
    match = re.fullmatch(r"(-?\d+)/(-?\d+)", string)
    if match is None or string != f"{int(match.group(1))}/{int(match.group(2))}":
        return string
    return "\\frac{" + match.group(1) + "}{" + match.group(2) + "}"


def _fix_sqrt(string):
    """`\\sqrt3` -> `\\sqrt{3}`."""
    pieces = string.split("\\sqrt")
    fixed = pieces[0]
    for piece in pieces[1:]:
        fixed += "\\sqrt" + (piece if piece.startswith("{") or not piece else "{" + piece[0] + "}" + piece[1:])
    return fixed


def strip_math_string(string):
    """Hendrycks' normalisation: drop spacing, \\left/\\right, degrees, dollars, units after
    `\\text{ `, percent, a short `k =` prefix and spaces; canonical fracs and sqrts; 0.5 -> 1/2."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        string = string.replace(old, new)
    if "\\text{ " in string:
        units = string.split("\\text{ ")
        if len(units) == 2:
            string = units[0]
    string = string.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        string = sides[1]
    string = _fix_fracs(_fix_sqrt(string).replace(" ", ""))
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def mathd_normalize(answer):
    """DeepScaleR's `mathd_normalize_answer`: strip, unwrap `\\text{...}`, normalise."""
    answer = answer.strip()
    match = re.fullmatch(r"\\text\{(?P<text>.+?)\}", answer)
    if match is not None:
        answer = match.group("text").strip()
    return strip_math_string(answer)


# ---------------------------------------------------------------------------------------------------
# DeepScaleR's sympy grading (grade_answer_sympy), with our own LaTeX-to-text step


_UNITS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week", "month",
          "year", "foot", "feet", "inch", "yard")
_LATEX_WORDS = (("\\pi", "pi"), ("\\infty", "oo"), ("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"),
                ("\\cup", "U"), ("\\left", ""), ("\\right", ""), ("\\,", ""), ("\\;", ""), ("\\!", ""),
                ("\\ ", ""))


def _braced(text, start):
    """(content, end) of the `{...}` group at text[start], or (text[start], start + 1) for a bare token."""
    if start >= len(text):
        return "", start
    if text[start] != "{":
        return text[start], start + 1
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start + 1:index], index + 1
    return text[start + 1:], len(text)


def _grouped(text):
    """`text` in parentheses unless it is one number or name (`\\frac{1}{2}` -> `1/2`, as pylatexenc
    writes it, so that DeepScaleR's reduced-fraction rule still sees a fraction)."""
    return text if re.fullmatch(r"[\w.]+", text) else f"({text})"


def latex_to_plain(expr):
    """A LaTeX answer as a sympy-parsable string (`\\frac{a+1}{b}` -> `(a+1)/b`, `\\sqrt{x}` ->
    `sqrt(x)`, `x^{2}` -> `x^2`, `\\pi` -> `pi`, `\\text{..}` -> its text); other commands lose
    their backslash. DeepScaleR uses pylatexenc for this; this keeps the package free of it."""
    for old, new in _LATEX_WORDS:
        expr = expr.replace(old, new)
    out, index = [], 0
    while index < len(expr):
        match = _LATEX_COMMAND.match(expr, index)
        if expr[index] == "^" and expr[index + 1:index + 2] == "{":
            power, index = _braced(expr, index + 1)
            power = latex_to_plain(power)
            out.append("^" + (power if re.fullmatch(r"\w+", power) else f"({power})"))
        elif match is None:
            out.append(expr[index])
            index += 1
        elif match.group(1) in ("frac", "dfrac", "tfrac"):
            numerator, index = _braced(expr, match.end())
            denominator, index = _braced(expr, index)
            out.append(f"{_grouped(latex_to_plain(numerator))}/{_grouped(latex_to_plain(denominator))}")
        elif match.group(1) == "sqrt" and expr[match.end():match.end() + 1] == "[":
            degree, _, rest = expr[match.end() + 1:].partition("]")
            radicand, consumed = _braced(rest, 0)
            index = len(expr) - len(rest) + consumed
            out.append(f"({latex_to_plain(radicand)})^(1/({latex_to_plain(degree)}))")
        elif match.group(1) == "sqrt":
            radicand, index = _braced(expr, match.end())
            out.append(f"sqrt({latex_to_plain(radicand)})")
        elif match.group(1) in ("text", "textbf", "mathrm", "mathbf", "mbox"):
            content, index = _braced(expr, match.end())
            out.append(latex_to_plain(content))
        else:
            out.append(match.group(1))
            index = match.end()
    return "".join(out).strip()


def _as_float(text):
    """float(text) when it is a finite number, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _str_is_int(text):
    value = _as_float(_strip_thousands(text))
    return value is not None and abs(value - round(value)) <= 1e-7


def _strip_thousands(expr):
    """`1,000,000` -> `1000000`, leaving tuple commas alone."""
    while True:
        stripped = re.sub(r"(\d)(,)(\d\d\d)($|\D)", r"\1\3\4", expr)
        if stripped == expr:
            return expr
        expr = stripped


def sympy_normalize(expr):
    """DeepScaleR's `_normalize`: text, units and LaTeX removed, lower case, integers canonical."""
    match = re.fullmatch(r"\\text\{(?P<text>.+?)\}", expr)
    expr = match.group("text") if match else expr
    for old, new in (("\\%", "%"), ("\\$", "$"), ("$", ""), ("%", ""), (" or ", " , "), (" and ", " , "),
                     ("million", "*10^6"), ("billion", "*10^9"), ("trillion", "*10^12")):
        expr = expr.replace(old, new)
    for unit in _UNITS:
        expr = re.sub(f"{unit}(es)?(s)? *(\\^[0-9]+)?", "", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    if len(expr) > 0 and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    value = _as_float(expr)
    if value is not None and abs(value - round(value)) <= 1e-7:
        expr = str(int(round(value)))
    if "\\" in expr:
        expr = latex_to_plain(expr)
    expr = re.sub("- *", "-", expr)
    expr = re.sub("([0-9]) +([0-9])", "\\1+\\2", expr)  # mixed numbers: 7 3/4 -> 7+3/4
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _str_is_int(expr):
        expr = str(int(float(_strip_thousands(expr).replace(",", ""))))
    return expr


def _sympy_may_try(expr):
    """DeepScaleR's guard against expressions sympy chokes on: at most two unknown letters, no
    braced or parenthesised powers, no stacked or multi-digit exponents."""
    letters = {char for char in expr.replace("sqrt", "").replace("frac", "") if char.isalpha()}
    return (len(letters) <= 2 and "^{" not in expr and "^(" not in expr
            and re.search(r"\^[0-9]+\^", expr) is None and re.search(r"\^[0-9][0-9]+", expr) is None)


def _split_tuple(expr):
    expr = _strip_thousands(expr)
    if len(expr) > 2 and expr[0] in "()[]" and expr[-1] in "()[]" and not any(c in expr[1:-1] for c in "()[]"):
        return [element.strip() for element in expr[1:-1].split(",")]
    return [expr] if expr else []


def _is_fraction(expr):
    return re.search(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$", expr) is not None


def _sympy_difference_is_zero(difference):
    """Runs in the sympy child process: does `difference` simplify to 0?"""
    import sympy
    from sympy.parsing import sympy_parser

    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
    try:
        parsed = sympy_parser.parse_expr(difference.replace("^", "**"), transformations=transformations)
        return bool(sympy.simplify(parsed) == 0)
    except Exception:  # an unparsable answer is simply not equal (DeepScaleR's rule)
        return False


def sympy_equal(truth_element, given_element, timeout=DEFAULT_SYMPY_TIMEOUT):
    """Whether sympy proves two normalised answers equal within `timeout` seconds (False if not)."""
    difference = f"({truth_element})-({given_element})"
    if not _sympy_may_try(difference):
        return False
    try:
        return _sympy_worker().call(f"{_MODULE}:_sympy_difference_is_zero", (difference,), {}, timeout)
    except TimeoutError:
        logger.debug("sympy gave up after %.1f s on %s", timeout, difference)
        return False


def grade_answer_sympy(given, truth, timeout=DEFAULT_SYMPY_TIMEOUT):
    """DeepScaleR's grade_answer_sympy: element-wise sympy equality of tuples/intervals; reduced
    fractions and integers must match exactly (no simplification)."""
    truth, given = sympy_normalize(truth), sympy_normalize(given)
    if truth == given:
        return True
    if not given:
        return False
    truth_elements, given_elements = _split_tuple(truth), _split_tuple(given)
    if len(truth_elements) > 1 and (truth[0] != given[0] or truth[-1] != given[-1]):
        return False
    if len(truth_elements) != len(given_elements):
        return False
    for truth_element, given_element in zip(truth_elements, given_elements):
        if _is_fraction(truth_element) and _is_fraction(given_element):
            equal = truth_element == given_element
        elif _str_is_int(truth_element) != _str_is_int(given_element):
            equal = False
        else:
            equal = sympy_equal(truth_element, given_element, timeout)
        if not equal:
            return False
    return True


def math_reward(response, ground_truth, sympy_timeout=DEFAULT_SYMPY_TIMEOUT, extra_info=None):
    """1.0 when the response's final boxed answer equals one of the ground truths, else 0.0."""
    del extra_info  # part of the grader signature; the math rule needs nothing per sample
    given = extract_answer(response)
    if given is None:
        return 0.0
    for truth in ground_truth_answers(ground_truth):
        if mathd_normalize(given) == mathd_normalize(truth) or grade_answer_sympy(given, truth, sympy_timeout):
            return 1.0
    return 0.0


def _start_sympy_worker():
    """Start the sympy child up front, so its start-up is not charged to the first sample's time."""
    _sympy_worker().start()


math_reward.prepare = _start_sympy_worker  # a grader's `prepare()` runs once in the worker before its first sample


def math_verify_reward(response, ground_truth, extra_info=None):
    """TRL's accuracy_reward rule with math-verify: boxed answers first, LaTeX only, units normalised."""
    del extra_info
    try:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError as error:
        raise ImportError("grader 'math_verify' needs the math-verify package (pip install math-verify); "
                          f"it is optional and not installed here ({error})") from error
    text = final_answer_text(response)
    if text is None:
        return 0.0
    truths = [str(truth) for truth in (ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth])]
    truths = [parse(truth if "$" in truth or "\\boxed" in truth else f"${truth}$") for truth in truths]
    require(all(truths), "ground_truth", ground_truth, "cannot be parsed by math-verify")
    config = LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                   try_extract_without_anchor=False)
    answer = parse(text, extraction_config=[config], extraction_mode="first_match")
    return float(any(verify(truth, answer) for truth in truths))


def resolve_grader(spec):
    """The grader function named by `spec`: deepscaler | math | math_verify | module:function.

    A grader is `function(response, ground_truth, **kwargs) -> number` (kwargs: the runner's
    grader_kwargs, plus `extra_info` when the batch has them); an optional `function.prepare()` runs
    once in the worker before the first sample, outside the per-sample time limit.
    """
    if spec in ("deepscaler", "math"):
        return math_reward
    if spec == "math_verify":
        return math_verify_reward
    require(isinstance(spec, str) and ":" in spec, "reward.grader", spec,
            f"must be one of {list(BUILTIN_GRADERS)} or 'module:function'")
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"reward.grader ({spec!r}) cannot be imported: {error}") from error
    require(callable(function), "reward.grader", spec, "must name a callable")
    return function


# ---------------------------------------------------------------------------------------------------
# A child process that runs functions under a time limit


def _write_frame(stream, message):
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def _read_exactly(fd, size, deadline):
    chunks, missing = [], size
    while missing:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, missing)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd, deadline=None):
    (size,) = struct.unpack("<Q", _read_exactly(fd, 8, deadline))
    return pickle.loads(_read_exactly(fd, size, deadline))


class _Worker:
    """One child interpreter that calls `module:function` targets; a call that overruns its time
    limit kills the child (and with it anything it started), and the next call starts a new one."""

    def __init__(self, name, preload=(), prepare=None):
        self.name, self._preload, self._prepare = name, tuple(preload), prepare
        self._process = None
        self._lock = threading.Lock()

    @property
    def pid(self):
        return None if self._process is None else self._process.pid

    def start(self):
        with self._lock:
            self._ensure_started()

    def _ensure_started(self):
        if self._process is not None and self._process.poll() is None:
            return
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root] + sys.path))
        self._process = subprocess.Popen([sys.executable, "-m", _MODULE, "--serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env, close_fds=True)
        _write_frame(self._process.stdin, {"preload": self._preload, "prepare": self._prepare})
        try:
            status, detail = _read_frame(self._process.stdout.fileno(), time.monotonic() + _STARTUP_TIMEOUT)
        except (TimeoutError, EOFError) as error:
            self._kill()
            raise RuntimeError(f"the {self.name} process did not start ({type(error).__name__})") from error
        if status != "ready":
            self._kill()
            raise RuntimeError(f"the {self.name} process could not load its code: {detail}")

    def call(self, target, args, kwargs, timeout):
        """target(*args, **kwargs) in the child: its result, RemoteError, or TimeoutError after
        `timeout` seconds (the child is then killed)."""
        with self._lock:
            self._ensure_started()
            try:
                _write_frame(self._process.stdin, (target, args, kwargs))
                status, value = _read_frame(self._process.stdout.fileno(), time.monotonic() + timeout)
            except TimeoutError:
                self._kill()
                raise
            except (EOFError, BrokenPipeError, OSError) as error:
                code = self._kill()
                raise RemoteError(f"the {self.name} process died (exit code {code})") from error
        if status == "error":
            raise RemoteError(value)
        return value

    def _kill(self):
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        return process.wait()

    def close(self):
        with self._lock:
            self._kill()


class RemoteError(RuntimeError):
    """A function run in a worker process raised; the message carries its type and text."""


_SYMPY_WORKER = None


def _sympy_worker():
    global _SYMPY_WORKER
    if _SYMPY_WORKER is None:
        if importlib.util.find_spec("sympy") is None:
            raise ImportError("the math grader's equivalence check needs sympy (pip install sympy)")
        _SYMPY_WORKER = _Worker("sympy", preload=("sympy", "sympy.parsing.sympy_parser"))
    return _SYMPY_WORKER


@atexit.register
def _close_sympy_worker():
    if _SYMPY_WORKER is not None:
        _SYMPY_WORKER.close()


def _die_with_parent():
    """A worker must not outlive the process that waits for it (a killed grader worker takes its
    sympy worker with it): PR_SET_PDEATHSIG on Linux, and a watchdog thread everywhere."""
    parent = os.getppid()
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _serve():
    """The worker's loop: read (target, args, kwargs), answer ("ok", result) or ("error", text)."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a grader prints goes to stderr, not into the reply stream
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer.fileno()
    _die_with_parent()
    setup = _read_frame(requests)
    try:
        for module in setup["preload"]:
            importlib.import_module(module)
        if setup["prepare"]:
            getattr(resolve_grader(setup["prepare"]), "prepare", lambda: None)()
    except Exception as error:
        _write_frame(replies, ("error", f"{type(error).__name__}: {error}"))
        return
    _write_frame(replies, ("ready", None))
    functions = {}
    while True:
        try:
            target, args, kwargs = _read_frame(requests)
        except EOFError:
            return
        try:
            if target not in functions:
                functions[target] = resolve_grader(target)
            reply = ("ok", functions[target](*args, **kwargs))
        except Exception as error:
            reply = ("error", f"{type(error).__name__}: {error}")
        try:
            _write_frame(replies, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            _write_frame(replies, ("error", f"the grader's result {reply[1]!r:.80} cannot be sent back: {error}"))


# ---------------------------------------------------------------------------------------------------
# Scoring a batch


class RewardError(RuntimeError):
    """Too many rewards in a batch could not be computed."""


@dataclasses.dataclass
class RewardBatch:
    """Scores of one batch ([N] float32, failures replaced by `on_error`) and what failed."""

    scores: np.ndarray
    failed: np.ndarray
    timeouts: int = 0
    exceptions: int = 0
    non_finite: int = 0
    first_error: str = None

    @property
    def failures(self):
        return int(self.failed.sum())


class RewardRunner:
    """Scores responses with one grader in a child process, each under `time_limit` seconds.

    A grader that raises, overruns the time limit, or returns something that is not a finite number
    scores `on_error` and is counted; a batch with more than `max_reward_error_frac` of its samples
    failed raises RewardError (a broken grader must not quietly train the policy on `on_error`).
    """

    def __init__(self, grader="deepscaler", time_limit=10.0, on_error=0.0, max_reward_error_frac=0.1,
                 grader_kwargs=None):
        resolve_grader(grader)  # a wrong name fails here, in the caller's process
        require(isinstance(time_limit, (int, float)) and 0 < time_limit < math.inf, "reward.time_limit",
                time_limit, "must be a positive number of seconds")
        require(isinstance(on_error, (int, float)) and math.isfinite(on_error), "reward.on_error", on_error,
                "must be a finite number")
        require(isinstance(max_reward_error_frac, (int, float)) and 0 <= max_reward_error_frac <= 1,
                "reward.max_reward_error_frac", max_reward_error_frac, "must be in [0, 1]")
        self.grader, self.time_limit, self.on_error = grader, float(time_limit), float(on_error)
        self.max_reward_error_frac = float(max_reward_error_frac)
        self.grader_kwargs = dict(grader_kwargs or {})
        self.total_scored = self.total_failed = 0
        self._worker = _Worker(f"reward grader {grader!r}", prepare=grader)
        self._finalizer = weakref.finalize(self, self._worker.close)  # no child left behind by a forgotten close()

    def score(self, responses, ground_truths, extra_infos=None):
        """RewardBatch for parallel lists of responses and ground truths (and optional extra infos)."""
        require(len(responses) == len(ground_truths), "ground_truths", len(ground_truths),
                f"must have one entry per response ({len(responses)})")
        require(extra_infos is None or len(extra_infos) == len(responses), "extra_infos", len(extra_infos or ()),
                f"must have one entry per response ({len(responses)})")
        batch = RewardBatch(np.full(len(responses), self.on_error, np.float32), np.zeros(len(responses), bool))
        for index, (response, truth) in enumerate(zip(responses, ground_truths)):
            kwargs = dict(self.grader_kwargs)
            if extra_infos is not None:
                kwargs["extra_info"] = extra_infos[index]
            self._score_one(batch, index, (response, truth), kwargs)
        self.total_scored += len(responses)
        self.total_failed += batch.failures
        self._check_failures(batch)
        return batch

    def _score_one(self, batch, index, args, kwargs):
        try:
            value = self._worker.call(self.grader, args, kwargs, self.time_limit)
        except TimeoutError:
            batch.timeouts += 1
            return self._fail(batch, index, f"timed out after {self.time_limit:g} s")
        except (RemoteError, RuntimeError) as error:
            batch.exceptions += 1
            return self._fail(batch, index, str(error))
        score = _as_score(value)
        if score is None:
            batch.non_finite += 1
            return self._fail(batch, index, f"returned {value!r}, not a finite number")
        batch.scores[index] = score
        return None

    @staticmethod
    def _fail(batch, index, reason):
        batch.failed[index] = True
        if batch.first_error is None:
            batch.first_error = f"sample {index}: {reason}"

    def _check_failures(self, batch):
        if not batch.failures:
            return
        summary = (f"{batch.failures} of {len(batch.scores)} rewards failed with grader {self.grader!r} "
                   f"({batch.timeouts} timed out, {batch.exceptions} raised, {batch.non_finite} not finite); "
                   f"first: {batch.first_error}")
        if batch.failures > self.max_reward_error_frac * len(batch.scores):
            raise RewardError(f"{summary}; that is more than reward.max_reward_error_frac "
                              f"({self.max_reward_error_frac:g}) of the batch")
        logger.warning("%s; they score reward.on_error (%g)", summary, self.on_error)

    def close(self):
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _as_score(value):
    """A grader's return value as a float, or None when it is not a finite number."""
    if isinstance(value, (bool, int, float, np.number)) and math.isfinite(float(value)):
        return float(value)
    return None


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
