"""How the house is built: imports flow one way, functions stay short, the root stays small, the documents match the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mpsearch"
MAX_FUNCTION_LINES = 60  # outside cli/, whose declarative register() tables are long by design
MAX_ROOT_MODULES = 8


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Every import of every module (module level or inside functions), as edges between package modules."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = parent.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    return next((found for module in sorted(graph) if module not in state and (found := visit(module))), None)


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert len(graph) > 50 and "mpsearch.study.driver" in graph["mpsearch.study"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = _import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert _cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def _long_functions(package: Path = PACKAGE) -> dict[str, int]:
    """``module:function`` -> lines, for every function (methods and nested ones too) longer than the cap."""
    long = {}
    for name, path in _modules(package).items():
        if ".cli" in name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return long


def test_no_function_outside_the_cli_is_over_60_lines():
    long = _long_functions()
    assert not long, long


def test_the_length_check_sees_methods_and_skips_the_cli(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "cli").mkdir(parents=True)
    statements = [f"x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES)]  # with its def line, one over the cap
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("def table():\n" + "".join("    " + s for s in statements))
    (pkg / "a.py").write_text("class A:\n    def long(self):\n" + "".join("        " + s for s in statements)
                              + "\n\ndef short():\n" + "".join("    " + s for s in statements[1:]))
    assert _long_functions(pkg) == {"pkg.a:long": MAX_FUNCTION_LINES + 1}


def test_the_root_holds_the_front_door_only():
    import mpsearch

    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root
    assert len(mpsearch.__all__) <= 15 and all(hasattr(mpsearch, name) for name in mpsearch.__all__)


def test_the_cli_reference_is_generated_from_the_parser():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "cli.md").read_text() == module.reference(), "run python scripts/cli_reference.py"


def test_the_docs_index_links_every_page_and_every_link_resolves():
    docs = ROOT / "docs"
    index = (docs / "index.md").read_text()
    for page in docs.rglob("*.md"):
        if page.name != "index.md":
            assert str(page.relative_to(docs)) in index, f"docs/index.md does not link {page.relative_to(docs)}"
    for page in [ROOT / "README.md", *docs.rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


def test_the_readme_is_a_users_document():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for phrase in ("this session", "target met", "target missed", "was lent", "to fit the session", "re-run pending"):
        assert phrase not in text.lower(), phrase


def test_the_readme_python_quickstart_runs_as_written(tmp_path, monkeypatch, cache_dir):
    """The README's Python quickstart, copied out of the README and executed as it is."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- quickstart-python -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    result, policy = namespace["result"], namespace["policy"]
    assert len(result.front) >= 1 and policy.layers and (tmp_path / "policy.json").exists()
