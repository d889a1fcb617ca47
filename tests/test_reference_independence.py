"""References are independent of the code they check (issue 14).

A reference that calls the helper an implementation uses for the same decision (a mask, the
visibility of a key, the choice of an activation) agrees with that implementation whatever the
helper does: a mutation of the helper passes every comparison. This file reads the sources:

* no ``*_ref`` function in ``ptpeft_kernels/ops`` uses, directly or through module-local helpers,
  a library function that any implementation code of ``ptpeft_kernels/ops`` (the ops files'
  other functions and module-level code, ``triton_impl``, ``cuda_impl``) also uses;
* ``tests/helpers.py`` (the first-principles references) imports nothing from ``ptpeft_kernels``
  except inside ``triton_marks`` (which only asks which backends exist).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "ptpeft_kernels" / "ops"

# Library functions a reference may share with the implementations: none today. An entry needs
# a reason why it decides nothing the reference checks (input validation, say).
ALLOWED: set[str] = set()


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _resolve_relative(module: str, level: int, target: str | None) -> str:
    base = module.split(".")[:-level]
    return ".".join(base + ([target] if target else []))


class _Module:
    """One source file: its top-level functions and what each uses of the library, qualified."""

    def __init__(self, name: str, source: str):
        self.name = name
        tree = ast.parse(source)
        self.imported: dict[str, str] = {}  # local name -> qualified library name (relative imports)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = _resolve_relative(name, node.level, node.module)
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = f"{base}.{alias.name}"
        self.functions = {
            n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        self.others = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]

    def uses(self, node: ast.AST) -> set[str]:
        """Qualified library names ``node`` refers to (calls, or functions handed on as values)."""
        out = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                if sub.id in self.functions:
                    out.add(f"{self.name}.{sub.id}")
                elif sub.id in self.imported:
                    out.add(self.imported[sub.id])
            elif (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Name)
                and sub.value.id in self.imported
                and sub.value.id not in self.functions
            ):
                out.add(f"{self.imported[sub.value.id]}.{sub.attr}")  # e.g. backends.register
        return out

    def closure(self, roots: list[ast.AST]) -> set[str]:
        """Everything ``roots`` use, following this module's own functions transitively."""
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            for used in self.uses(todo.pop()):
                if used not in seen:
                    seen.add(used)
                    local = used.removeprefix(f"{self.name}.")
                    if used.startswith(f"{self.name}.") and local in self.functions:
                        todo.append(self.functions[local])
        return seen


def shared_decisions(sources: dict[str, str]) -> dict[str, set[str]]:
    """For each ``*_ref`` function in ``sources`` (module name -> code): library names it shares with
    the implementation code of all the modules."""
    modules = {name: _Module(name, src) for name, src in sources.items()}
    refs: dict[str, set[str]] = {}
    implementation: set[str] = set()
    for mod in modules.values():
        ref_nodes = [f for n, f in mod.functions.items() if n.endswith("_ref")]
        ref_uses = mod.closure(ref_nodes)
        ref_only = {n for n in mod.functions if n.endswith("_ref") or f"{mod.name}.{n}" in ref_uses}
        # Roots of the implementation: module-level code and every function the references do not reach.
        roots = mod.others + [f for n, f in mod.functions.items() if n not in ref_only]
        implementation |= mod.closure(roots) | {f"{mod.name}.{n}" for n in mod.functions if n not in ref_only}
        for n, f in mod.functions.items():
            if n.endswith("_ref"):
                refs[f"{mod.name}.{n}"] = mod.closure([f])
    return {ref: (uses & implementation) - ALLOWED for ref, uses in refs.items()}


def _ops_sources() -> dict[str, str]:
    return {_module_name(p): p.read_text() for p in sorted(OPS.rglob("*.py"))}


def test_every_reference_found_is_checked():
    names = set(shared_decisions(_ops_sources()))
    want = {f"ptpeft_kernels.ops.{op}.{op if op != 'lora' else 'lora_linear'}_ref" for op in
            ("prefix_attention", "lora", "adapter")}  # fmt: skip
    assert want <= names, f"references found: {sorted(names)}"


def test_library_references_share_no_decision_helper_with_the_implementations():
    shared = {ref: sorted(used) for ref, used in shared_decisions(_ops_sources()).items() if used}
    assert not shared, f"references calling helpers the implementations also use: {shared}"


def test_the_check_catches_a_shared_helper():
    """The rule has teeth: the shape of the bug issue 14 found (a mask helper in both paths) is reported,
    through a module-local helper chain and through a relative import alike."""
    sources = {
        "ptpeft_kernels.ops.op": (
            "from .activations import activate\n"
            "def _mask(n):\n    return n\n"
            "def _ref_only(n):\n    return n\n"
            "def _via(n):\n    return _mask(n)\n"
            "def op_ref(x):\n    return _ref_only(_via(x)) + activate(x)\n"
            "def _joint(x):\n    return _mask(x)\n"
        ),
        "ptpeft_kernels.ops.activations": "def activate(h):\n    return h\n",
        "ptpeft_kernels.ops.triton_impl.op": "from ..activations import activate\nactivate(1)\n",
    }
    assert shared_decisions(sources) == {
        "ptpeft_kernels.ops.op.op_ref": {
            "ptpeft_kernels.ops.op._mask",
            "ptpeft_kernels.ops.activations.activate",
        }
    }
    independent = {
        "ptpeft_kernels.ops.op": "def _own(n):\n    return n\ndef op_ref(x):\n    return _own(x)\n"
    }
    assert shared_decisions(independent) == {"ptpeft_kernels.ops.op.op_ref": set()}


def test_test_helpers_import_nothing_from_the_library_outside_triton_marks():
    tree = ast.parse((REPO / "tests" / "helpers.py").read_text())
    allowed = set()
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name == "triton_marks":
            allowed = {id(n) for n in ast.walk(fn)}
    offending = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else ["(relative)"]
        if (
            any(n.split(".")[0] in ("ptpeft_kernels", "(relative)") for n in names)
            and id(node) not in allowed
        ):
            offending.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not offending, offending
