"""Name → class lookup, so YAML can say `type: DeepseekV3ForCausalLM` and plugins can add names.

MindFormers users point `--register_path` at a folder of model code; importing that folder runs
its `@register(...)` decorators, after which its classes can be built from config by name. Kinds
keep namespaces apart ("model", "config", "data_loader", "optimizer", ...).
"""
import difflib
import importlib
import importlib.util
import os
import sys

_REGISTRY = {}


class RegistryError(KeyError):
    def __str__(self):  # KeyError would wrap the message in quotes
        return str(self.args[0])


def register(kind, name=None):
    """Class/function decorator: `@register("model")` registers under the object's own name."""
    def decorator(obj):
        key = name or obj.__name__
        table = _REGISTRY.setdefault(kind, {})
        existing = table.get(key)
        if existing is not None and _identity(existing) != _identity(obj):
            raise RegistryError(f"{kind} {key!r} is already registered by {_identity(existing)}; "
                                f"{_identity(obj)} cannot take the same name")
        table[key] = obj
        return obj
    return decorator


def _identity(obj):
    # The same class imported twice under two module paths (e.g. `research.deepseek3.x` and, via
    # --register_path, `deepseek3.x`) is the same registration; compare by file and qualified name.
    module = sys.modules.get(obj.__module__)
    source = os.path.realpath(getattr(module, "__file__", "") or obj.__module__)
    return f"{obj.__qualname__} ({source})"


def get(kind, name):
    table = _REGISTRY.get(kind, {})
    if name not in table:
        known = sorted(table)
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RegistryError(f"no {kind} named {name!r} is registered (known: {', '.join(known) or 'none'}){hint} "
                            "— is its folder passed with --register_path?")
    return table[name]


def names(kind):
    return sorted(_REGISTRY.get(kind, {}))


def build(kind, config, **extra):
    """Instantiate `config["type"]` of `kind` with the rest of `config` (plus `extra`) as arguments."""
    if not isinstance(config, dict) or "type" not in config:
        raise RegistryError(f"a {kind} config needs a 'type' key naming a registered {kind}, got {config!r}")
    arguments = {key: value for key, value in config.items() if key not in ("type", "auto_register")}
    arguments.update(extra)
    return get(kind, config["type"])(**arguments)


def import_register_path(path):
    """Import a plugin folder so its classes register themselves (MindFormers' `--register_path`).

    A folder with `__init__.py` is imported as a package (its `__init__` imports what it
    registers); a plain folder has every `*.py` module in it imported.
    """
    folder = os.path.abspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--register_path {path!r} is not a directory")
    parent, package = os.path.split(folder)
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        if parent not in sys.path:
            sys.path.insert(0, parent)
        return [importlib.import_module(package)]
    if folder not in sys.path:
        sys.path.insert(0, folder)
    modules = sorted(name[:-3] for name in os.listdir(folder) if name.endswith(".py"))
    return [importlib.import_module(module) for module in modules]
