"""The house is one-directional: no import cycle among peft_ops' modules, no private name imported from
another module, and only model.py puts modules into a model."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "peft_ops"


def _modules(package=PACKAGE):
    return {p.stem: ast.parse(p.read_text()) for p in package.glob("*.py") if p.stem != "__init__"}


def _imports(tree) -> list[tuple[str, list[str]]]:
    """(peft_ops module imported, names) for every import of a sibling module, lazy ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.append((node.module.split(".")[0], [a.name for a in node.names]))
            elif node.level == 1:
                found += [(a.name, []) for a in node.names]
            elif node.module and node.module.startswith("peft_ops."):
                found.append((node.module.split(".")[1], [a.name for a in node.names]))
    return found


def _cycle(graph):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_no_import_cycle():
    graph = {name: {m for m, _ in _imports(tree) if m != "kernels"} for name, tree in _modules().items()}
    assert _cycle(graph) is None, _cycle(graph)
    kernels = {name: {m for m, _ in _imports(tree)} for name, tree in _modules(PACKAGE / "kernels").items()}
    assert _cycle(kernels) is None, _cycle(kernels)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_private_name_crosses_a_module():
    for package in (PACKAGE, PACKAGE / "kernels"):
        crossing = [(name, module, n) for name, tree in _modules(package).items() for module, names in _imports(tree)
                    for n in names if n.startswith("_") and n != "__version__"]
        assert crossing == [], package


def test_only_model_py_replaces_modules():
    setters = [name for name, tree in _modules().items() for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr"
               and getattr(node.args[0], "id", None) != "self" and name != "model"]  # a module's own buffers: fine
    assert setters == []
