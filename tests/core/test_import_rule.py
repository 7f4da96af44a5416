"""The core never imports a model plugin: nothing under `mindpretrain/` imports `research`.

The core reaches a model only through its registered `ModelSpec` (`mindpretrain/model_spec.py`), so a second
model family plugs in without a core change. Every .py file is parsed (not imported, so lazy imports inside
functions count too) and every import of `research` is reported with its file and line: absolute imports,
relative imports that resolve to it, and module names given as string literals to importlib / `__import__`.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "mindpretrain"
FORBIDDEN = "research"
IMPORT_CALLS = ("import_module", "__import__", "find_spec")


def _is_forbidden(module):
    return bool(module) and module.split(".")[0] == FORBIDDEN


def _resolve_relative(package, level, module):
    """The absolute module a `from <level dots><module> import ...` in `package` names (dots beyond the top
    package leave nothing, which Python refuses at run time but is still a reach for a top-level name)."""
    parts = package.split(".")
    kept = len(parts) - (level - 1)
    return ".".join((parts[:kept] if kept > 0 else []) + ([module] if module else []))


def _call_name(node):
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def forbidden_imports(source, package, filename="<source>"):
    """[(line, what)] for every import of `research` in `source`, a module of `package`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {alias.name}") for alias in node.names if _is_forbidden(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = _resolve_relative(package, node.level, module)
            names = [module] if module else []
            names += [f"{module}.{alias.name}".lstrip(".") for alias in node.names]
            if any(_is_forbidden(name) for name in names):
                found.append((node.lineno, f"from {'.' * node.level}{node.module or ''} import "
                                           f"{', '.join(alias.name for alias in node.names)}"))
        elif isinstance(node, ast.Call) and _call_name(node) in IMPORT_CALLS:
            literals = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
            found += [(node.lineno, f"{_call_name(node)}({text!r})") for text in literals if _is_forbidden(text)]
    return sorted(found)


def _package_of(path):
    """The package relative imports in `path` start from (a package's own name for its __init__.py)."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def test_detector_sees_every_form_of_import():
    source = "\n".join([
        "import research.deepseek3",
        "from research.deepseek3.hf_weights import load_hf_weights",
        "def lazy():",
        "    from research import deepseek3",
        "from .... import research",
        "import importlib",
        "importlib.import_module('research.deepseek3.spec')",
        "__import__('research')",
        "import mindpretrain.research_notes",
        "from mindpretrain import registry",
        "importlib.import_module('json')",
    ])
    lines = [line for line, _ in forbidden_imports(source, "mindpretrain.checkpoint")]
    assert lines == [1, 2, 4, 5, 7, 8]


def test_core_does_not_import_the_plugin():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for line, what in forbidden_imports(source, _package_of(path), str(path)):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, ("the core must reach a model through its registered ModelSpec "
                           "(mindpretrain.model_spec), not by importing the plugin:\n  " + "\n  ".join(offenders))
