"""Guards of the code's shape (docs/ARCHITECTURE.md): they fail the moment the structure rots.

- no import cycle between stdaemon's modules;
- pure modules do no I/O and read no clock;
- the built wheel holds every package and module, and each imports from it;
- a module over 500 lines says why at its top;
- services are wired in one composition root: no probing of the App, no attribute bolted on it;
- the dependency picture in docs/ARCHITECTURE.md is the one the imports draw.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from functools import lru_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "stdaemon")

#: Modules of pure logic: no I/O, no clock reads, no Twisted reactor; they import only each other.
PURE_MODULES = {
    "stdaemon.timestamps",
    "stdaemon.invalid",
    "stdaemon.http.client_ip",
    "stdaemon.outbound.breaker",
    "stdaemon.outbound.retry",
    "stdaemon.jobs.status",
    "stdaemon.jobs.updates",
    "stdaemon.jobs.costs",
    "stdaemon.providers.model_versions",
    "stdaemon.providers.settings",
    "stdaemon.webhooks.signature",
    "stdaemon.ratelimit.rules",
    "stdaemon.ratelimit.sliding_window",
    "stdaemon.users.csrf",
    "stdaemon.approvals.rules",
    "stdaemon.cluster.messages",
    "stdaemon.cluster.settings",
    "stdaemon.s3.aws_chunked",
    "stdaemon.s3.checksums",
    "stdaemon.s3.keys",
    "stdaemon.s3.metadata",
    "stdaemon.s3.sigv4",
    "stdaemon.s3.subresources",
    "stdaemon.s3.xml_documents",
}

#: What a pure module may not import (I/O, threads, the reactor, web frameworks, SDKs).
IO_MODULES = (
    "twisted.internet", "twisted.web", "twisted.application", "treq", "klein", "txredisapi",
    "sqlite3", "socket", "ssl", "subprocess", "threading", "shutil", "tempfile", "select",
    "urllib.request", "http.client", "boto3", "botocore", "hvac", "redis", "requests",
)
#: Calls that read a clock or touch files from a pure module.
IMPURE_CALLS = {
    ("time", "time"), ("time", "monotonic"), ("time", "sleep"), ("time", "perf_counter"),
    ("datetime", "now"), ("datetime", "utcnow"), ("date", "today"),
}

MAX_LINES = 500
#: A module longer than MAX_LINES carries a line starting with this in its docstring, saying why.
SIZE_REASON = "Size:"


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


@lru_cache(maxsize=None)
def modules() -> dict[str, str]:
    found = {}
    for root, _dirs, files in os.walk(PACKAGE):
        if "__pycache__" in root:
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                found[module_name(path)] = path
    return found


@lru_cache(maxsize=None)
def tree(name: str) -> ast.Module:
    with open(modules()[name], encoding="utf-8") as handle:
        return ast.parse(handle.read())


def imported(name: str) -> set[str]:
    """Every module ``name`` imports, at any level (a function-level import is still a dependency):
    stdaemon modules by their module name, others by their dotted name."""
    known = modules()
    out: set[str] = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            inner = [s for s in subs if s in known]
            out.update(inner or [node.module])
    return out


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(name) if m in known and m != name} for name in known}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # recursion depth is bounded by the module count (~150)
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert strongly_connected(internal_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_pure_modules_exist_and_do_no_io():
    known = modules()
    assert PURE_MODULES <= set(known), sorted(PURE_MODULES - set(known))
    problems = []
    for name in sorted(PURE_MODULES):
        for dep in imported(name):
            if dep.startswith("stdaemon") and dep in known and dep not in PURE_MODULES \
                    and not known[dep].endswith("__init__.py"):
                problems.append(f"{name} imports the non-pure {dep}")
            if any(dep == io or dep.startswith(io + ".") for io in IO_MODULES):
                problems.append(f"{name} imports {dep}")
        for node in ast.walk(tree(name)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "open":
                problems.append(f"{name}:{node.lineno} opens a file")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in IMPURE_CALLS:
                    problems.append(f"{name}:{node.lineno} reads the clock ({func.value.id}.{func.attr})")
                if func.value.id == "os":
                    problems.append(f"{name}:{node.lineno} calls os.{func.attr}")
    assert problems == []


def test_long_modules_say_why():
    unexplained = []
    for name, path in sorted(modules().items()):
        with open(path, encoding="utf-8") as handle:
            count = sum(1 for _ in handle)
        if count <= MAX_LINES:
            continue
        doc = ast.get_docstring(tree(name)) or ""
        if not any(line.strip().startswith(SIZE_REASON) for line in doc.splitlines()):
            unexplained.append(f"{name} ({count} lines)")
    assert unexplained == [], f"over {MAX_LINES} lines without a '{SIZE_REASON} …' line in the docstring"


PROBE = re.compile(r"\b(?:getattr|hasattr)\(\s*(?:self\.)?_?(?:ctx|app)\b\s*,")
BOLTED = re.compile(r"^\s*(?:self\.)?_?(?:ctx|app)\.(\w+)\s*(?::[^=]+)?=(?!=)", re.M)


def test_services_are_wired_only_by_the_composition_root():
    """No `getattr(ctx, "x", None)` probes, no `install(ctx)` functions, no attribute set on the App
    outside stdaemon/service.py; every service the App declares is assigned there exactly once."""
    problems = []
    for name, path in sorted(modules().items()):
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        for match in PROBE.finditer(source):
            line = source.count("\n", 0, match.start()) + 1
            problems.append(f"{name}:{line} probes the App")
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.FunctionDef) and node.name == "install" \
                    and node.args.args and node.args.args[0].arg in ("ctx", "app"):
                problems.append(f"{name}:{node.lineno} install({node.args.args[0].arg}) outside the root")
        if name not in ("stdaemon.service", "stdaemon.app"):
            for match in BOLTED.finditer(source):
                line = source.count("\n", 0, match.start()) + 1
                problems.append(f"{name}:{line} sets App.{match.group(1)}")
    assert problems == []

    app_class = next(n for n in tree("stdaemon.app").body if isinstance(n, ast.ClassDef) and n.name == "App")
    declared = {n.target.id for n in app_class.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is None}
    build = next(n for n in tree("stdaemon.service").body
                 if isinstance(n, ast.FunctionDef) and n.name == "build_app")
    assigned: dict[str, int] = {}
    for node in ast.walk(build):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) \
                        and leaf.value.id == "app" and isinstance(leaf.ctx, ast.Store):
                    assigned[leaf.attr] = assigned.get(leaf.attr, 0) + 1
    assert declared, "App declares its services as annotations"
    assert {k: v for k, v in assigned.items() if v != 1} == {}
    assert sorted(declared - set(assigned)) == []
    assert sorted(set(assigned) - declared) == [], "build_app sets an attribute the App does not declare"


def test_the_wheel_holds_every_module_and_each_imports_from_it(tmp_path):
    dist = tmp_path / "dist"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(dist), REPO], check=True, cwd=tmp_path, timeout=300)
    wheels = list(dist.glob("stdaemon-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(site), str(wheels[0])], check=True, cwd=tmp_path, timeout=300)
    expected = sorted(modules())
    script = (
        "import importlib, json, os, sys\n"
        "names = json.loads(sys.argv[1])\n"
        "failed = {}\n"
        "for name in names:\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        "        if not module.__file__.startswith(sys.argv[2]):\n"
        "            failed[name] = 'imported from ' + module.__file__\n"
        "    except Exception as e:\n"
        "        failed[name] = repr(e)\n"
        "import twisted.plugins.stdaemon_plugin as plugin\n"
        "from stdaemon.console import http as console\n"
        "print(json.dumps({'failed': failed, 'plugin': plugin.__file__,\n"
        "                  'console': sorted(os.listdir(console.WEB_DIR))}))\n"
    )
    import json

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(expected), str(site)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    assert result["plugin"].startswith(str(site))
    assert {"index.html", "console.css", "console.js"} <= set(result["console"])


# -- the picture in docs/ARCHITECTURE.md ------------------------------------------------------

PICTURE_START = "<!-- dependencies: generated from the imports; tests/test_architecture.py checks it -->"


def package_of(name: str) -> str:
    """``stdaemon.jobs.http`` → ``jobs``; a top-level module (``stdaemon.timers``) is its own box."""
    return name.split(".")[1]


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, deps in internal_graph().items():
        if name == "stdaemon":
            continue
        source = package_of(name)
        graph.setdefault(source, set())
        for dep in deps:
            if dep == "stdaemon":
                continue
            target = package_of(dep)
            if target != source:
                graph[source].add(target)
    return graph


def render_picture() -> str:
    graph = package_graph()
    width = max(len(k) for k in graph)
    lines = [f"{name.ljust(width)} → {', '.join(sorted(graph[name])) or '—'}" for name in sorted(graph)]
    return "\n".join(lines)


def test_architecture_picture_matches_the_imports():
    with open(os.path.join(REPO, "docs", "ARCHITECTURE.md"), encoding="utf-8") as handle:
        text = handle.read()
    assert PICTURE_START in text
    block = text.split(PICTURE_START, 1)[1].split("```", 2)[1].strip("\n")
    assert block == render_picture(), "regenerate with: python -m tests.test_architecture"


if __name__ == "__main__":
    print(render_picture())
