"""Imports point one way (docs/architecture.md): the shared modules in xmodal/ import none of the
parts; training, the indexer and the client import only the shared modules; export imports the
training library (the models it exports, the run format) but never the training loop; the
`xmodal` command (cli.py, demo.py) sits on top of everything; the Python models copied into a
Triton repository import no xmodal at all (they run in NVIDIA's container without it)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"training": "xmodal.training", "export": "xmodal.export", "indexer": "xmodal.indexer",
         "client": "xmodal.client"}
COMMAND = {"xmodal.cli", "xmodal.demo"}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    folder, *rest = relative.parts
    package = PARTS.get(folder, "xmodal")
    name = ".".join([package, *rest])
    return name.removesuffix(".__init__")


def xmodal_imports(path: Path) -> set[str]:
    """The xmodal modules `path` imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "xmodal"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "xmodal":
            # `from xmodal import store` imports xmodal.store; `from xmodal.x import y` imports xmodal.x
            found |= ({f"xmodal.{alias.name}" for alias in node.names} if node.module == "xmodal"
                      else {node.module})
    return found


def part_of(module: str) -> str:
    """"training", "export", "indexer", "client", "command" or "shared"."""
    for folder, package in PARTS.items():
        if module == package or module.startswith(package + "."):
            return folder
    return "command" if module in COMMAND else "shared"


def allowed(importer: str, imported: str) -> bool:
    source, target = part_of(importer), part_of(imported)
    if source == "command" or target == "shared" or source == target:
        return source != "shared" or target == "shared"
    if source == "export" and target == "training":
        return imported != "xmodal.training.train"  # the library it exports, not the loop
    return False


def source_files() -> list[Path]:
    files = [path for folder in ("xmodal", *PARTS) for path in sorted((ROOT / folder).rglob("*.py"))]
    return [path for path in files if "backends" not in path.parts]


def test_the_rule_itself():
    assert allowed("xmodal.indexer.pipeline", "xmodal.store")
    assert allowed("xmodal.export.onnx", "xmodal.training.models")
    assert allowed("xmodal.cli", "xmodal.training.train")
    assert not allowed("xmodal.export.onnx", "xmodal.training.train")
    assert not allowed("xmodal.indexer.pipeline", "xmodal.client.sdk")
    assert not allowed("xmodal.indexer.formats", "xmodal.training.readers")
    assert not allowed("xmodal.store", "xmodal.client")
    assert not allowed("xmodal.client.sdk", "xmodal.indexer")
    assert module_name(ROOT / "indexer" / "__init__.py") == "xmodal.indexer"
    assert module_name(ROOT / "client" / "sdk.py") == "xmodal.client.sdk"


@pytest.mark.parametrize("path", source_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_point_one_way(path):
    importer = module_name(path)
    wrong = sorted(imported for imported in xmodal_imports(path) if not allowed(importer, imported))
    assert not wrong, f"{importer} ({part_of(importer)}) imports {', '.join(wrong)}: see docs/architecture.md"


@pytest.mark.parametrize("path", sorted((ROOT / "model_repository").glob("*/1/model.py")),
                         ids=lambda path: path.parent.parent.name)
def test_served_python_models_import_no_xmodal(path):
    assert not xmodal_imports(path), f"{path} runs in Triton's container without xmodal"
