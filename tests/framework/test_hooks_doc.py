"""docs/hooks.md lists every hookspec with its exact signature, and every hook has a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from lmport import hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "hooks.md"


def hook_specs() -> dict[str, object]:
    return {name: fn for name, fn in vars(hookspecs).items() if name.startswith("lmport_") and callable(fn)}


def signature_line(name: str, fn) -> str:
    """``name(arg: Type, ...) -> Return`` from the spec's (string) annotations."""
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


def documented_signatures() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("lmport_")]
    return {line.split("(", 1)[0]: line for line in lines}


def test_every_hookspec_is_documented_with_its_exact_signature():
    documented = documented_signatures()
    for name, fn in hook_specs().items():
        assert name in documented, f"{name} is not documented in docs/hooks.md"
        assert documented[name] == signature_line(name, fn), f"docs/hooks.md has a stale signature for {name}"


def test_the_doc_lists_no_hook_that_does_not_exist():
    assert set(documented_signatures()) <= set(hook_specs())


def test_the_doc_says_how_each_hooks_results_combine():
    text = DOC.read_text()
    for name, fn in hook_specs().items():
        first = fn.lmport_spec["firstresult"]
        row = re.search(rf"^\| `{name}` \| (first|all) \|", text, flags=re.M)
        assert row, f"{name} has no row in a phase table of docs/hooks.md"
        assert row.group(1) == ("first" if first else "all"), f"{name}: the doc says {row.group(1)}"


def test_every_hookspec_has_a_docstring():
    for name, fn in hook_specs().items():
        assert fn.__doc__ and len(fn.__doc__.split()) > 15, f"{name} needs a real docstring"


def test_every_hook_is_named_in_some_test():
    """Each hook area has tests that exercise it; they name the hook they cover."""
    this = Path(__file__).resolve()
    test_files = [p for p in (ROOT / "tests").rglob("test_*.py") if p.resolve() != this]
    test_files += list((ROOT / "plugins").glob("*/tests/test_*.py"))
    sources = "\n".join(p.read_text() for p in test_files)
    untested = [name for name in hook_specs() if name not in sources]
    assert not untested, f"hooks no test names: {untested}"
