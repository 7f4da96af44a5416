"""The registry and --register_path plugin loading."""
import textwrap

import pytest

from mindpretrain import registry


def test_register_build_and_errors():
    @registry.register("test_kind")
    class Widget:
        def __init__(self, size, color="red"):
            self.size, self.color = size, color

    widget = registry.build("test_kind", {"type": "Widget", "size": 3}, color="blue")
    assert (widget.size, widget.color) == (3, "blue")
    with pytest.raises(registry.RegistryError, match="did you mean Widget"):
        registry.get("test_kind", "Widgte")
    with pytest.raises(registry.RegistryError, match="needs a 'type' key"):
        registry.build("test_kind", {"size": 1})

    with pytest.raises(registry.RegistryError, match="already registered"):
        @registry.register("test_kind", name="Widget")
        class Other:
            pass


def test_register_path_imports_plugin_package(tmp_path):
    plugin = tmp_path / "myplugin_pkg"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("from . import things\n")
    (plugin / "things.py").write_text(textwrap.dedent("""
        from mindpretrain.registry import register

        @register("test_plugin")
        class PluginModel:
            pass
    """))
    registry.import_register_path(str(plugin))
    assert "PluginModel" in registry.names("test_plugin")
    registry.import_register_path(str(plugin))  # importing twice is harmless


def test_register_path_plain_folder_and_missing(tmp_path):
    (tmp_path / "loose_module_for_test.py").write_text(
        "from mindpretrain.registry import register\n@register('test_loose')\ndef make():\n    return 1\n")
    registry.import_register_path(str(tmp_path))
    assert registry.build("test_loose", {"type": "make"}) == 1
    with pytest.raises(FileNotFoundError, match="not a directory"):
        registry.import_register_path(str(tmp_path / "absent"))
