"""The Slicer extension's files agree with each other: CMake lists, the module file, its .ui, README and CI."""

from __future__ import annotations

import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODULE_DIR = ROOT / "AACScore"


def _module_cmake() -> str:
    return (MODULE_DIR / "CMakeLists.txt").read_text()


def test_top_level_cmake_is_a_slicer_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    for needed in ("project(AACScore)", "EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION",
                   "EXTENSION_ICONURL", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(AACScore)", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert needed in text, needed


def test_module_cmake_lists_every_library_file_and_resource():
    text = _module_cmake()
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    listed = set(re.findall(r"^\s+([\w./-]+\.\w+)\s*$", text, flags=re.MULTILINE))
    library = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "AACScoreLib").rglob("*.py")
               if "__pycache__" not in p.parts}
    resources = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                 if p.is_file()}
    missing = sorted((library | resources) - listed)
    assert not missing, f"not listed in AACScore/CMakeLists.txt: {missing}"
    stale = sorted(p for p in listed if not (MODULE_DIR / p).exists())
    assert not stale, f"listed in AACScore/CMakeLists.txt but absent: {stale}"


def test_module_file_compiles(tmp_path):
    py_compile.compile(str(MODULE_DIR / "AACScore.py"), cfile=str(tmp_path / "AACScore.pyc"), doraise=True)


def test_every_widget_the_module_names_exists_in_the_ui():
    source = (MODULE_DIR / "AACScore.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    tree = ET.parse(MODULE_DIR / "Resources" / "UI" / "AACScore.ui")
    defined = {w.get("name") for w in tree.iter() if w.tag in ("widget", "action", "layout") and w.get("name")}
    assert not used - defined, f"widgets used in AACScore.py but missing from AACScore.ui: {sorted(used - defined)}"


def test_readme_opens_with_the_demo_and_test_commands_and_ci_runs_the_latter():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.DOTALL)
    first_commands = [line.split("#")[0].strip() for line in blocks[0].splitlines()
                      if line.strip() and not line.startswith("#")]
    assert len(first_commands) == 2, first_commands
    demo_command, test_command = first_commands
    assert "demo" in demo_command and "test" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_what_runs_in_old_slicers_parses_as_python_39():
    """Slicer 5.6 and 5.8 run Python 3.9: the module must load there to say why it cannot score."""
    import ast

    for path in (MODULE_DIR / "AACScore.py", MODULE_DIR / "AACScoreLib" / "slicer" / "dependencies.py",
                 MODULE_DIR / "AACScoreLib" / "slicer" / "sample_data.py", MODULE_DIR / "AACScoreLib" / "errors.py"):
        text = path.read_text()
        assert text.count("from __future__ import annotations") == 1, path
        ast.parse(text, str(path), feature_version=(3, 9))


def test_extension_depends_on_the_pytorch_extension():
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', (ROOT / "CMakeLists.txt").read_text())
