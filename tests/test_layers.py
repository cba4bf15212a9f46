"""The import layers of densessl (docs/architecture.md): a module imports only from its own layer
or the layers below it. Every import of every module is checked, at module level and inside
functions (a lazy import is still a dependency)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "densessl"

# The one table of layers, bottom (0) to top. A top-level module or package of densessl maps to
# its layer; the package root (densessl/__init__.py: the version) counts as common.
LAYERS = {
    "common": 0, "densessl": 0,
    "config": 1, "models": 1,
    "data": 2,
    "methods": 3,
    "eval": 4,
    "engine": 5,
    "interop": 6,
    "study": 7, "report": 7,
    "cli": 8, "bench": 8, "bench_views": 8, "demo": 8, "__main__": 8,
}
LAYER_NAMES = ["common", "config/models", "data", "methods", "eval", "engine", "interop", "study/report", "cli"]

# Edges from a lower layer up that are tolerated for a while, as (source layer, module) pairs,
# each with the reason; empty since the redesign (issue 19), and meant to stay so.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def top_level(module: str) -> str:
    """'densessl.eval.knn' -> 'eval'; 'densessl' -> 'densessl'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, this: str, is_package: bool):
    """(line, densessl module) for every import in `tree`; `from densessl import x` names the
    submodule x when there is one."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of this module
                base = this.split(".") if is_package else this.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                sub_path = PACKAGE.parent.joinpath(*sub.split("."))
                yield node.lineno, sub if sub_path.with_suffix(".py").exists() or sub_path.is_dir() else module


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        this = module_name(path)
        source = top_level(this)
        assert source in LAYERS, f"{path}: densessl.{source} has no layer in tests/test_layers.py's LAYERS"
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in imported_modules(tree, this, path.name == "__init__.py"):
            if module != "densessl" and not module.startswith("densessl."):
                continue
            target = top_level(module)
            assert target in LAYERS, f"{path}:{line}: densessl.{target} has no layer in LAYERS"
            if LAYERS[target] > LAYERS[source] and (source, module) not in ALLOWED_UPWARD:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {this} (layer "
                                f"{LAYER_NAMES[LAYERS[source]]}) imports {module} (layer "
                                f"{LAYER_NAMES[LAYERS[target]]}, higher)")
    return problems


def test_no_module_imports_from_a_higher_layer():
    problems = upward_imports()
    assert not problems, "imports from a higher layer into a lower one:\n" + "\n".join(problems)


def test_the_allow_list_holds_only_edges_that_still_exist():
    """An allowed edge that no module uses any more is dropped from ALLOWED_UPWARD."""
    used = set()
    for path in PACKAGE.rglob("*.py"):
        this = module_name(path)
        for _, module in imported_modules(ast.parse(path.read_text()), this, path.name == "__init__.py"):
            used.add((top_level(this), module))
    assert ALLOWED_UPWARD <= used, f"no longer imported, remove from ALLOWED_UPWARD: {sorted(ALLOWED_UPWARD - used)}"


def test_the_check_finds_an_upward_import():
    tree = ast.parse("def f():\n    from densessl.engine.trainer import Trainer\n")
    assert list(imported_modules(tree, "densessl.data.views", False)) == [(2, "densessl.engine.trainer")]


def test_no_method_file_imports_another_method_file():
    """A method file builds on the shared parts (densessl.methods.PARTS), never on another method."""
    from densessl.methods import PARTS

    problems = []
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        if path.stem in PARTS or path.name == "__init__.py":
            continue
        for line, module in imported_modules(ast.parse(path.read_text()), f"densessl.methods.{path.stem}", False):
            parts = module.split(".")
            if parts[:2] == ["densessl", "methods"] and len(parts) > 2 and parts[2] not in PARTS:
                problems.append(f"methods/{path.name}:{line} imports {module}")
    assert not problems, "\n".join(problems)


def test_no_cycle_between_config_and_methods():
    for module in ("config", "common/registry"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        assert not [m for _, m in imported_modules(tree, f"densessl.{module.replace('/', '.')}", False)
                    if m.startswith("densessl.methods")], module
