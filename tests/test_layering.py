"""The layering docs/architecture.md states ("## Layers"), checked from every module's imports (read with `ast`,
function-level imports included): each unit imports only from its own layer or below, the units of layers 2 to 5 do
not import each other, the table names every unit in the tree, and no imports go in a circle."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "paraloop"
DOC = REPO / "docs" / "architecture.md"
INDEPENDENT = range(2, 6)  # in these layers the units of one layer do not import each other


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The paraloop modules `name` imports (`from pkg import submodule` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import paraloop.engine.worker.X` -> the module holding X
                target = target.rpartition(".")[0]
            if target.startswith("paraloop") and target != name:
                found.add(target)
    return found


def unit(module: str) -> str:
    """paraloop.run.learner -> run; paraloop.config -> config; paraloop -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layers() -> dict[str, int]:
    text = DOC.read_text()
    table = text[text.index("## Layers") :].split("\n## ")[0]
    out: dict[str, int] = {}
    for line in table.splitlines():
        row = re.match(r"\|\s*(\d+)\s[^|]*\|(.*)\|\s*$", line)
        if row:
            for name in re.findall(r"`([^`]+)`", row[2]):
                assert name not in out, f"{name} is in two layers of docs/architecture.md"
                out[name] = int(row[1])
    assert out, "docs/architecture.md has no layer table under '## Layers'"
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_layer_table_names_every_unit_in_the_tree():
    table = layers()
    tree = {unit(m) for m in modules()}
    assert sorted(tree - set(table)) == [], "units missing from docs/architecture.md's layer table"
    assert sorted(set(table) - tree) == [], "docs/architecture.md's layer table names units that do not exist"


def layering_errors(g: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    wrong = []
    for module, targets in sorted(g.items()):
        here = table[unit(module)]
        for target in sorted(targets):
            there = table[unit(target)]
            if there > here:
                wrong.append(f"{module} (layer {here}) imports {target} (layer {there})")
            elif there == here and here in INDEPENDENT and unit(target) != unit(module):
                wrong.append(f"{module} imports {target}: units of layer {here} are independent")
    return wrong


def test_no_module_imports_from_a_layer_above_or_a_neighbour_of_its_layer():
    assert layering_errors(graph(), layers()) == []


def strongly_connected(g: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not (size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(group)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert strongly_connected(graph()) == []


def test_the_checks_can_fail():
    """A planted cycle is found; an engine module importing run/, and the server importing atropos/, are caught."""
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    planted = {
        "paraloop.engine.worker": {"paraloop.run.wiring", "paraloop.config"},
        "paraloop.server.app": {"paraloop.atropos.client", "paraloop.engine"},
    }
    assert layering_errors(planted, layers()) == [
        "paraloop.engine.worker (layer 2) imports paraloop.run.wiring (layer 5)",
        "paraloop.server.app imports paraloop.atropos.client: units of layer 3 are independent",
    ]


def mapped_files() -> set[str]:
    """The files docs/architecture.md's "## Map" names: `pkg/` bullets name their package's files."""
    text = DOC.read_text()
    section = text[text.index("## Map") :].split("\n## ")[0]
    bullets = re.split(r"\n- ", "\n" + section.split("\n- ", 1)[1]) if "\n- " in section else []
    named = set()
    for bullet in bullets:
        bullet = bullet.strip("\n").split("\n\n")[0]  # a bullet ends at a blank line (prose follows the list)
        package = re.match(r"`(\w+)/`:", bullet)
        for file in re.findall(r"`(\w+\.py)`", bullet):
            named.add(f"{package[1]}/{file}" if package else file)
    return named


def test_the_map_names_every_module_and_only_modules_that_exist():
    tree = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent == SRC}
    named = mapped_files()
    assert not tree - named, f"modules the map in docs/architecture.md does not name: {sorted(tree - named)}"
    assert not named - tree, f"the map names files that do not exist: {sorted(named - tree)}"


def test_no_test_module_imports_another():
    """Helpers live in tests/support/; a test module importing another runs that module's tests' setup twice and
    hides where a helper lives."""
    tests = Path(__file__).parent
    for path in tests.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            bad = [n for n in names if n.split(".")[0].startswith("test_") or n.startswith("tests")]
            assert not bad, f"{path.name} imports {bad}: move what it needs into tests/support/"


def test_the_run_packages_own_map_names_each_of_its_files():
    """run/__init__.py's docstring is the page a reader of `paraloop run` starts from."""
    text = (SRC / "run" / "__init__.py").read_text()
    missing = [p.name for p in (SRC / "run").glob("*.py") if p.name != "__init__.py" and p.name not in text]
    assert not missing, f"run/__init__.py's map lacks {missing}"
