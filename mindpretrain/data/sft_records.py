"""Chat records for supervised fine-tuning: reading them one at a time, and validating them into conversations.

The record format is the one of the public DeepSeek-671B-SFT-Guide (OpenAI `messages`, extended for
reasoning data), one JSON object per record:

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "reasoning_content": "...", "loss": true}]}

Inputs are jsonl (optionally gzipped) or one JSON array of records (the guide's `train_example.json`); the
format is recognised from the first character, so a `.json` file may be either. Every record carries its
source (`file:line`, or `file:record N` for arrays) so that a rejected record can be found again.

Validation turns a record into a `Conversation` or raises `RecordError` with one stable short code (the
keys of REJECT_REASONS) and a human message naming the message number (1-based, as in the record).
Reasoning is merged exactly as the guide does (`"<think>\\n" + reasoning + "\\n</think>\\n\\n" + content`);
`loss` (default true; the strings "true"/"false" are accepted as the guide's xtuner code reads them) marks
the assistant turns that are trained.
"""
import codecs
import gzip
import json
import re
from dataclasses import dataclass

from mindpretrain.data.preprocess import PreprocessError

REJECT_REASONS = {
    "invalid_json": "the record is not valid JSON",
    "no_messages": "the record has no list of messages",
    "bad_role": "a message has no role or an unknown one",
    "tool_calls": "tool calls and tool messages are not supported",
    "bad_content": "a content or reasoning_content is not a string",
    "bad_loss": "a loss is not true/false, or is set on a message that is not an assistant's",
    "reasoning_twice": "reasoning_content is given and the content has a <think> block too",
    "empty_turn": "a trained assistant turn is empty",
    "assistant_first": "the conversation starts with an assistant turn",
    "consecutive_assistants": "two assistant turns in a row",
    "ends_with_user": "the conversation ends with a user turn",
    "special_tokens": "a text holds a tokenizer control token",
    "no_target": "no assistant turn is trained",
    "overlong": "longer than --seq-length tokens",
    "token_boundary": "a trained span does not start or end on a token boundary",
    "template_error": "the chat template refused the conversation",
}

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_LOSS_STRINGS = {"true": True, "false": False}
_READ_CHUNK = 1 << 20


class RecordError(ValueError):
    """One record that cannot be used: `code` (a key of REJECT_REASONS), `detail`, the 1-based message number."""

    def __init__(self, code, detail, message_number=None):
        super().__init__(code, detail, message_number)
        self.code, self.detail, self.message_number = code, detail, message_number

    def describe(self, source):
        """The one-line form `file:line: message N: code: detail`."""
        where = f"message {self.message_number}: " if self.message_number is not None else ""
        return f"{source}: {where}{self.code}: {self.detail}"


@dataclass(frozen=True)
class SourceRecord:
    """The raw JSON text (str, or the bytes of a jsonl line) of one record, its source and size in bytes."""
    source: str
    payload: object
    nbytes: int


@dataclass(frozen=True)
class Turn:
    """A validated message; an assistant's `content` already holds its merged reasoning."""
    role: str
    content: str
    trained: bool
    number: int  # 1-based position in the record's messages; 0 for a --default-system message


@dataclass(frozen=True)
class Conversation:
    turns: tuple

    @property
    def trained_turns(self):
        return [turn for turn in self.turns if turn.trained]


def merge_reasoning(content, reasoning):
    """The guide's merge of an assistant's reasoning into its content (nothing to merge when empty)."""
    if not reasoning:
        return content
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}"


def has_reasoning_tag(text):
    return THINK_OPEN in text or THINK_CLOSE in text


# ---------------------------------------------------------------------------------------------- reading


class InputError(PreprocessError):
    """An input file that cannot be read on (not a single record's problem)."""


def read_records(path):
    """Yield the `SourceRecord`s of a jsonl / jsonl.gz / JSON-array file, in file order."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            head = handle.peek(_READ_CHUNK) if hasattr(handle, "peek") else b""
            if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                yield from _array_records(path, handle)
            else:
                yield from _jsonl_records(path, handle)
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None


def _jsonl_records(path, handle):
    for line_number, line in enumerate(handle, 1):
        if line.strip():
            yield SourceRecord(f"{path}:{line_number}", line, len(line))  # bytes: bad UTF-8 is that record's reject


def _array_records(path, handle):
    """Stream the elements of one top-level JSON array without holding the whole file.

    A syntax error cannot be stepped over inside an array (where the next record starts is unknown), so it
    ends the file with an `InputError` naming the record, whatever --on-error says."""
    reader = _TextBuffer(handle, path)
    decoder = json.JSONDecoder()
    reader.skip_whitespace(skip_bom=True)
    reader.expect("[", path, "the array")
    number = 0
    while True:
        reader.skip_whitespace()
        if reader.peek() == "]":
            reader.advance(1)
            reader.skip_whitespace()
            if reader.peek() != "":
                raise InputError(f"{path}: text after the end of the JSON array of {number} records")
            return
        if number:
            reader.expect(",", path, f"record {number}")
            reader.skip_whitespace()
        number += 1
        text = reader.decode_value(decoder, path, number)
        yield SourceRecord(f"{path}:record {number}", text, len(text.encode("utf-8")))


class _TextBuffer:
    """Incrementally decoded UTF-8 text with a read position; reads more only when a value is incomplete."""

    def __init__(self, handle, path):
        self._handle, self._path = handle, path
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._text, self._pos, self._eof = "", 0, False
        self._consumed = 0  # bytes read so far, for the position of a UTF-8 error

    def _fill(self, at_least=_READ_CHUNK):
        if self._eof:
            return False
        self._text = self._text[self._pos:]
        self._pos = 0
        data = self._handle.read(max(at_least, _READ_CHUNK))
        self._eof = not data
        try:
            self._text += self._decoder.decode(data, final=self._eof)
        except UnicodeDecodeError as error:
            raise InputError(f"{self._path}: not UTF-8 near byte {self._consumed + error.start} "
                             f"({error.reason})") from None
        self._consumed += len(data)
        return True

    def peek(self):
        while self._pos >= len(self._text) and self._fill():
            pass
        return self._text[self._pos:self._pos + 1]

    def advance(self, count):
        self._pos += count

    def skip_whitespace(self, skip_bom=False):
        while self.peek() and (self.peek() in " \t\r\n" or (skip_bom and self.peek() == "\ufeff")):
            self._pos += 1

    def expect(self, char, path, where):
        if self.peek() != char:
            found = self.peek() or "the end of the file"
            raise InputError(f"{path}: invalid JSON array: expected {char!r} after {where}, found {found!r}")
        self._pos += 1

    def decode_value(self, decoder, path, number):
        while True:
            try:
                _, end = decoder.raw_decode(self._text, self._pos)
                if end < len(self._text) or self._eof:  # a number at the buffer's end might go on
                    text = self._text[self._pos:end]
                    self._pos = end
                    return text
            except ValueError as error:
                if self._eof:
                    raise InputError(f"{path}:record {number}: invalid_json: {error}; a JSON array cannot be "
                                     "read past a syntax error") from None
            self._fill(at_least=2 * (len(self._text) - self._pos))


# -------------------------------------------------------------------------------------------- validation


class RecordValidator:
    """Parses and validates records; `forbidden` are the strings no text may hold (the tokenizer's added tokens:
    in content they would be tokenized as control tokens, e.g. a fake `<｜Assistant｜>` turn)."""

    def __init__(self, forbidden=(), default_system=None):
        self._forbidden = _StringFinder(forbidden)
        self.default_system = default_system

    def find_forbidden(self, text):
        return self._forbidden.find(text)

    def parse(self, payload):
        """The record of a JSON text: a dict with a non-empty `messages` list."""
        try:
            record = json.loads(payload)
        except ValueError as error:  # JSONDecodeError, and UnicodeDecodeError for a line that is not UTF-8
            raise RecordError("invalid_json", str(error)) from None
        if not isinstance(record, dict):
            raise RecordError("no_messages", f"expected a JSON object, got {type(record).__name__}")
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            found = "no 'messages' key" if "messages" not in record else f"'messages' is {messages!r:.40}"
            raise RecordError("no_messages", f"expected a non-empty list of messages, {found}")
        return record

    def validate(self, record):
        """A `Conversation` from a parsed record, or the first `RecordError` in message order."""
        turns = [self._turn(message, number) for number, message in enumerate(record["messages"], 1)]
        if self.default_system is not None and not any(turn.role == "system" for turn in turns):
            turns.insert(0, Turn("system", self.default_system, False, 0))
        _check_structure(turns)
        return Conversation(tuple(turns))

    def _turn(self, message, number):
        if not isinstance(message, dict):
            raise RecordError("bad_role", f"expected a JSON object, got {type(message).__name__}", number)
        role = message.get("role")
        if role in TOOL_ROLES or message.get("tool_calls") not in (None, []):
            raise RecordError("tool_calls", f"role {role!r} with tool calls or outputs is not supported", number)
        if role not in ROLES:
            raise RecordError("bad_role", f"role {role!r} is not one of {', '.join(ROLES)}", number)
        content = message.get("content")
        if not isinstance(content, str):
            raise RecordError("bad_content", f"content is {type(content).__name__}, expected a string", number)
        for key in ("reasoning", "thinking"):
            if key in message:
                raise RecordError("bad_content", f"{key!r} is not read; the reasoning goes in reasoning_content",
                                  number)
        reasoning = self._reasoning(message, role, content, number)
        trained = _loss(message, role, number)
        for what, text in (("content", content), ("reasoning_content", reasoning)):
            token = self.find_forbidden(text or "")
            if token is not None:
                raise RecordError("special_tokens", f"{what} holds the control token {token!r}", number)
        merged = merge_reasoning(content, reasoning)
        if trained and not merged.strip():
            raise RecordError("empty_turn", "the assistant content is empty but the turn is trained", number)
        return Turn(role, merged, trained, number)

    @staticmethod
    def _reasoning(message, role, content, number):
        reasoning = message.get("reasoning_content")
        if reasoning is None:
            return None
        if not isinstance(reasoning, str):
            raise RecordError("bad_content", f"reasoning_content is {type(reasoning).__name__}, "
                                             "expected a string", number)
        if reasoning and role != "assistant":
            raise RecordError("bad_content", f"reasoning_content on a {role} message", number)
        if reasoning and has_reasoning_tag(content):
            raise RecordError("reasoning_twice", "reasoning_content is given and the content holds "
                                                 f"{THINK_OPEN}/{THINK_CLOSE} too", number)
        if has_reasoning_tag(reasoning):
            raise RecordError("special_tokens", f"reasoning_content holds {THINK_OPEN} or {THINK_CLOSE}", number)
        return reasoning


def _loss(message, role, number):
    """Whether an assistant turn is trained: `loss` true (the default), false, or the strings "true"/"false"."""
    if "loss" not in message:
        return role == "assistant"
    value = message["loss"]
    if isinstance(value, str) and value.lower() in _LOSS_STRINGS:
        value = _LOSS_STRINGS[value.lower()]
    if not isinstance(value, bool):
        raise RecordError("bad_loss", f"loss is {value!r}, expected true, false, \"true\" or \"false\"", number)
    if role != "assistant":
        raise RecordError("bad_loss", f"loss is set on a {role} message; only assistant turns are trained", number)
    return value


def _check_structure(turns):
    """Turn order as the chat templates expect it (system messages may stand anywhere: templates hoist them)."""
    dialogue = [turn for turn in turns if turn.role != "system"]
    if not dialogue:
        raise RecordError("no_target", "the record has only system messages", turns[-1].number)
    if dialogue[0].role == "assistant":
        raise RecordError("assistant_first", "the first turn after the system messages is the assistant's",
                          dialogue[0].number)
    for before, turn in zip(dialogue, dialogue[1:]):
        if before.role == turn.role == "assistant":
            raise RecordError("consecutive_assistants", f"follows the assistant turn of message {before.number}",
                              turn.number)
    if dialogue[-1].role == "user":
        raise RecordError("ends_with_user", "the last turn is the user's; nothing answers it", dialogue[-1].number)
    if not any(turn.trained for turn in dialogue):
        raise RecordError("no_target", "every assistant turn has loss false")


class _StringFinder:
    """Finds the first of many literal strings in a text, fast when they are rare.

    One regex alternation of ~800 control tokens costs ~15 ms per 100k characters; scanning for their distinct
    two-character prefixes first and trying the alternation only there costs next to nothing on ordinary text."""

    def __init__(self, strings):
        strings = sorted({s for s in strings if s}, key=len, reverse=True)
        self._full = re.compile("|".join(map(re.escape, strings))) if strings else None
        prefixes = sorted({s[:2] for s in strings}, key=len, reverse=True)
        self._prefix = re.compile("|".join(map(re.escape, prefixes))) if strings else None

    def find(self, text):
        if self._full is None:
            return None
        for candidate in self._prefix.finditer(text):
            match = self._full.match(text, candidate.start())
            if match:
                return match.group()
        return None
