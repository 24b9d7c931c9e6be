"""The package layering the folders claim, checked from the source: every import, including those
inside functions (a lazy import is still a dependency), between kvbm_codec's top-level packages.

Fails on any loop between two top-level packages (or modules: ``kv``, ``api``, ``texts``, ``cli``),
on any loop between two modules (files) inside a package, and on each edge the architecture forbids
(docs/architecture.md).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kvbm_codec"
GENERATED = {"_proto"}

# (from, to): imports that must not exist. The codec is math over KV and a calibration's parameters;
# the KVBM adapter speaks the contract (api) and a client, never the core or a server.
FORBIDDEN = {
    ("codec", "calibration"),
    ("codec", "service"),
    ("codec", "adapters"),
    ("codec", "core"),
    ("codec", "frontends"),
    ("codec", "server"),
    ("codec", "models"),
    ("codec", "store"),
    ("adapters", "core"),
    ("adapters", "service"),
    ("adapters", "server"),
    ("calibration", "eval"),
    ("core", "frontends"),
    ("core", "server"),
    ("core", "calibration"),
    ("store", "codec"),
}
# The contract and the KV layout sit under everything: they import no other kvbm_codec package.
FOUNDATION = {"kv": set(), "api": {"kv"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every kvbm_codec module ``path`` imports, anywhere in the file."""
    mod = _module_name(path).split(".")
    package = mod if path.name == "__init__.py" else mod[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {n for n in out if n == "kvbm_codec" or n.startswith("kvbm_codec.")}


def _top(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def _modules() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py")) if not GENERATED & set(p.relative_to(ROOT).parts)]


def package_graph() -> dict[str, dict[str, set[str]]]:
    """top-level package -> imported top-level package -> the modules that make the edge."""
    known = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _modules()}
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in _modules():
        src = _top(_module_name(path))
        for name in _imports(path):
            dst = _top(name)
            if src and dst and dst != src and dst in known:  # `kvbm_codec.__version__` is no package
                graph[src][dst].add(_module_name(path))
    return graph


def _cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Every strongly connected component with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {w for e in graph.values() for w in e}):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    """The checks below are only as good as the walk: it must see what a reader would call a dependency."""
    src = (
        "from __future__ import annotations\n"
        "import kvbm_codec.store.base\n"
        "from . import sibling\n"
        "from ..core import service\n"
        "def f():\n"
        "    from kvbm_codec.frontends.grpc.client import CodecClient\n"
    )
    pkg = ROOT / "adapters"
    fake = pkg / "_architecture_probe.py"
    assert not fake.exists()
    fake.write_text(src, encoding="utf-8")
    try:
        got = _imports(fake)
    finally:
        fake.unlink()
    assert {
        "kvbm_codec.store.base",
        "kvbm_codec.adapters.sibling",
        "kvbm_codec.core.service",
        "kvbm_codec.frontends.grpc.client",
    } <= got


def test_the_cycle_finder_finds_a_loop() -> None:
    g = {"a": {"b": {"m"}}, "b": {"c": {"m"}}, "c": {"a": {"m"}}, "d": {"a": {"m"}}}
    assert _cycles(g) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": {"m"}}}) == []


def test_no_loop_between_top_level_packages() -> None:
    graph = package_graph()
    loops = _cycles(graph)
    detail = {
        " <-> ".join(c): {f"{a}->{b}": sorted(graph[a][b]) for a in c for b in c if b in graph.get(a, {})}
        for c in loops
    }
    assert not loops, f"import loops between packages: {detail}"


def module_graph() -> dict[str, dict[str, set[str]]]:
    """module -> imported module, between files; a package's ``__init__`` is left out as a target,
    since it only hands on what its modules define (a submodule importing its own package's face
    is not a dependency on its siblings)."""
    paths = _modules()
    modules = {_module_name(p) for p in paths if p.name != "__init__.py"}
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in paths:
        src = _module_name(path)
        for name in _imports(path):
            if name in modules and name != src:
                graph[src][name].add(src)
    return graph


def test_no_loop_between_modules() -> None:
    loops = _cycles(module_graph())
    assert not loops, f"import loops between modules (a lazy import counts): {loops}"


@pytest.mark.parametrize("edge", sorted(FORBIDDEN), ids=lambda e: f"{e[0]}->{e[1]}")
def test_forbidden_edge_is_absent(edge: tuple[str, str]) -> None:
    src, dst = edge
    assert (ROOT / src).is_dir() and (ROOT / dst).is_dir(), f"{edge} names a package that does not exist"
    made_by = package_graph().get(src, {}).get(dst, set())
    assert not made_by, f"{src}/ must not import {dst}/, but {sorted(made_by)} do"


def test_the_contract_and_kv_layout_import_nothing_above_them() -> None:
    graph = package_graph()
    for pkg, allowed in FOUNDATION.items():
        extra = set(graph.get(pkg, {})) - allowed
        assert not extra, f"{pkg} imports {sorted(extra)}: {dict(graph[pkg])}"


def test_demos_are_not_imported_by_the_library() -> None:
    users = {src for src, dsts in package_graph().items() if "demos" in dsts}
    assert users <= {"cli"}, f"only the CLI may start a demo; {sorted(users)} import demos/"


# What a front end (and the data-path transport) may not touch: the core's store, its private key
# builder, its admission context manager (each verb admits itself), and frame parsing (the core
# parses each frame once; a front end that parses again is doing the core's work).
EDGE_PACKAGES = ("frontends", "transport")
EDGE_FORBIDDEN_ATTRS = {"store", "_key", "request", "decoder_for", "encoder"}
EDGE_FORBIDDEN_MODULES = {"kvbm_codec.codec.frame", "kvbm_codec.store"}


def _edge_violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        # `x.store`, `svc._key(...)`; `.request` only off the service (`svc`/`service`/`core`):
        # HTTP client objects have a `.request` of their own
        if isinstance(node, ast.Attribute) and node.attr in EDGE_FORBIDDEN_ATTRS:
            base = node.value
            owner = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
            if node.attr != "request" or owner in {"svc", "service", "core"}:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    for name in _imports(path):
        if any(name == m or name.startswith(m + ".") for m in EDGE_FORBIDDEN_MODULES):
            out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


def test_front_ends_only_call_core_verbs() -> None:
    bad = [
        v for pkg in EDGE_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) for v in _edge_violations(p)
    ]
    assert not bad, f"front ends reaching into the core (use a BlockService verb): {bad}"


def test_the_edge_check_sees_a_reach_into_the_core() -> None:
    probe = ROOT / "frontends" / "_architecture_probe.py"
    assert not probe.exists()
    probe.write_text(
        "from kvbm_codec.codec import frame as fr\n"
        "def f(self, svc, k):\n"
        "    with svc.request('get'):\n"
        "        return fr.read_frame(self.svc.store.get(svc._key(k)))\n",
        encoding="utf-8",
    )
    try:
        got = " ".join(_edge_violations(probe))
    finally:
        probe.unlink()
    for what in (".store", "._key", ".request", "kvbm_codec.codec.frame"):
        assert what in got, (what, got)
