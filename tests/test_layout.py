"""The layout rules of stages/ (../shared/DESIGN.md): no stage module imports another, and each dvc.yaml stage's
deps list exactly the project modules its command runs, so that editing one module re-runs only what uses it; and
each stage reads top to bottom: no module in stages/ over 600 lines, no function over 60."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"
STAGE_MODULES = {"data", "prepare", "weights", "extract", "audit", "head", "finetune", "report"}


def module_file(name: str) -> Path:
    """stages.x.y -> stages/x/y.py, or stages/x/y/__init__.py for a package."""
    path = REPO.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(name: str) -> set[str]:
    """The stages.* modules `name` imports anywhere in its file (lazy imports inside functions included)."""
    tree = ast.parse(module_file(name).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("stages.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            if node.module == "stages":
                found |= {f"stages.{a.name}" for a in node.names}
            else:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}").exists()}
    return {m for m in found if module_file(m).exists()}


def closure(name: str) -> set[str]:
    """`name` and every stages.* module it imports, directly or not (a package brings its __init__)."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts)) if module_file(".".join(parts[:i])).exists()]
        todo += sorted(imports_of(module))
    return seen


def covered(module: str, deps: list[str]) -> bool:
    path = module_file(module).relative_to(REPO).as_posix()
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def stage_entries() -> dict[str, tuple[str, list[str]]]:
    """{dvc.yaml stage: (the stages.* module its command runs, its deps)} for the stages running a stage module."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        commands = body["cmd"] if isinstance(body["cmd"], list) else [body["cmd"]]
        module = next(c.split()[2] for c in commands[::-1] if c.split()[:2] == ["python", "-m"])
        found[name] = (module, [str(d) for d in body.get("deps", [])])
    return found


def test_no_stage_module_imports_another() -> None:
    for stage in STAGE_MODULES:
        others = {m for m in closure(f"stages.{stage}") if m.split(".")[1] in STAGE_MODULES} - {f"stages.{stage}"}
        assert not others, f"stages/{stage}.py imports the stage module(s) {sorted(others)}"


def test_each_stage_lists_exactly_the_modules_it_runs() -> None:
    for name, (module, deps) in stage_entries().items():
        runs = closure(module)
        missing = sorted(m for m in runs if not covered(m, deps))
        assert not missing, f"dvc.yaml stage {name} runs {missing} without listing them in deps"
        listed = [d for d in deps if d.startswith("stages/")]
        extra = [d for d in listed if not any(covered(m, [d]) for m in runs)]
        assert not extra, f"dvc.yaml stage {name} lists {extra} in deps but does not run them"


def test_the_closure_follows_lazy_and_package_imports() -> None:
    extract = closure("stages.extract")
    assert {"stages.extract_ray", "stages.engines", "stages.engines.choose", "stages.engines.onnxruntime",
            "stages.engines.openvino", "stages.features"} <= extract
    assert "stages.extract" not in closure("stages.head")


# ------------------------------------------------------------------------------------------------ size limits
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60  # ast end_lineno - lineno + 1: the signature, docstring and body (decorators not counted)


def function_lengths(source: str, module: str) -> dict[str, int]:
    """{"<module>::<qualified name>": lines} of every function and method in `source`, nested ones included."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    found[f"{module}::{name}"] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def sizes_over_limit() -> dict[str, int]:
    """{module path or module::function: lines} of everything in stages/ over its limit."""
    over = {}
    for path in sorted(STAGES.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            over[path.relative_to(REPO).as_posix()] = lines
        lengths = function_lengths(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix())
        over.update({name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES})
    return over


def test_modules_and_functions_stay_within_the_size_limits() -> None:
    over = sizes_over_limit()
    assert not over, (f"over the limits ({MAX_MODULE_LINES} lines a module in stages/, {MAX_FUNCTION_LINES} a "
                      f"function): {over}; split by concern (../shared/DESIGN.md)")


def test_the_size_check_measures_methods_and_nested_functions() -> None:
    source = ("import functools\n\n\n"
              "@functools.cache\n"
              "def outer(x):\n"
              "    def inner(y):\n"
              "        return y\n"
              "    return inner(x)\n\n\n"
              "class Box:\n"
              "    async def open(self):\n"
              "        pass\n")
    assert function_lengths(source, "m.py") == {"m.py::outer": 4, "m.py::outer.inner": 2, "m.py::Box.open": 2}
