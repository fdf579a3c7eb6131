"""The import rules of the layout (docs/architecture.md, "Layers"), checked on the source:
each room imports only what it may, so the client -> streaming -> system -> client cycle and
its like cannot come back unnoticed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "transferqueue"


def imports_of(path: Path) -> set[str]:
    """Every transferqueue module ``path`` imports (at any depth, type-checking ones too)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] == "transferqueue"}


def modules(pattern: str) -> list[Path]:
    return sorted(PACKAGE.glob(pattern))


def room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def offending(paths: list[Path], allowed: set[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in paths:
        bad = {
            m
            for m in imports_of(path)
            if m not in ("transferqueue", "transferqueue.ops")
            and not any(m == a or m.startswith(a + ".") for a in allowed)
        }
        # `from transferqueue.x import name` adds "transferqueue.x.name": judged by its module
        bad = {m for m in bad if not any(m.rsplit(".", 1)[0] == a for a in allowed)}
        if bad:
            out[path.name] = bad
    return out


RUNTIME = {"transferqueue.runtime", "transferqueue.config", "transferqueue.errors"}
CLIENT = {
    "transferqueue.client",
    "transferqueue.metadata",
    "transferqueue.storage._arena",
    "transferqueue.storage._field",
    "transferqueue.storage._pool",
    # save_checkpoint / load_checkpoint delegate (lazily) to the checkpoint module, which
    # stands on the client: the methods are the client's API, the work is in ops/
    "transferqueue.ops.checkpoint",
}


@pytest.mark.parametrize(
    ("pattern", "allowed"),
    [
        # the runtime knows nothing of partitions, storage or clients
        ("runtime/**/*.py", RUNTIME),
        # the client room stands on the runtime, the metadata and storage's pure tensor
        # kernels (its routing gathers rows as the units do); never on an actor, the system,
        # streaming or kv, which are built on it
        ("client/*.py", RUNTIME | CLIENT),
        # kv and streaming stand on the client and the metadata, nothing lower or higher
        ("kv.py", {"transferqueue.client", "transferqueue.metadata", "transferqueue.errors"}),
        (
            "streaming.py",
            {
                "transferqueue.client",
                "transferqueue.metadata",
                "transferqueue.errors",
                "transferqueue.config",
            },
        ),
        # the controller never imports storage, and storage never the controller
        ("controller/*.py", RUNTIME | {"transferqueue.controller", "transferqueue.metadata"}),
        ("storage/*.py", RUNTIME | {"transferqueue.storage"}),
    ],
)
def test_room_imports_only_what_it_may(pattern: str, allowed: set[str]) -> None:
    paths = modules(pattern)
    assert paths, pattern
    assert offending(paths, allowed) == {}


@pytest.mark.parametrize("name", ["state.py", "reads.py", "samplers.py"])
def test_controller_logic_is_free_of_io(name: str) -> None:
    path = PACKAGE / "controller" / name
    tree = ast.parse(path.read_text())
    plain = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    plain |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "asyncio" not in plain
    assert not {m for m in plain if m.startswith("transferqueue.runtime")}


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from transferqueue.system import init\n")
    assert offending([bad], RUNTIME) == {
        "bad.py": {"transferqueue.system", "transferqueue.system.init"}
    }


TRANSPORT_NAMES = {"inproc", "zmq", "ray"}
#: commands that exist for one transport: `serve` is the zmq server (it refuses another)
SERVES_ONE = {"serve.py"}
#: the config's checks say which keys belong to which transport
NAMES_THEM = {"config.py"}


def transport_branches(path: Path) -> list[int]:
    """Lines of ``path`` that compare something with a transport's name."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = [
                o for o in operands if isinstance(o, ast.Constant) and o.value in TRANSPORT_NAMES
            ]
            if named:
                lines.append(node.lineno)
    return lines


def test_no_transport_name_branches_outside_the_transports() -> None:
    """What differs between transports is a property of the transport class
    (``cross_process``, ``names_actors``, ``find_named``...), asked, not a name compared."""
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in modules("**/*.py")
        if "transports" not in path.parts
        and path.name not in SERVES_ONE | NAMES_THEM
        and (lines := transport_branches(path))
    }
    assert found == {}


def test_the_branch_finder_sees_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\nif config.transport == 'ray':\n    pass\n")
    assert transport_branches(bad) == [2]


#: what an actor process imports to host the controller or a storage unit, and a client that
#: only imports the package; none of them may pull in tensordict (~1.4 s: it loads
#: torch._dynamo), which only the client's batch building and the codec's TensorDicts need
LEAN_IMPORTS = {
    "the controller's actor": "transferqueue.controller.actor",
    "a storage unit's actor": "transferqueue.storage.unit",
    "the zmq actor host": "transferqueue.runtime.transports.zmq_actor",
    "the ray actor host": "transferqueue.runtime.transports.ray",
    "the package alone": "transferqueue",
}


def test_actor_processes_start_without_tensordict() -> None:
    import subprocess
    import sys

    code = (
        "import importlib, sys\n"
        f"for name in {list(LEAN_IMPORTS.values())!r}:\n"
        "    importlib.import_module(name)\n"
        "    print(name, sorted(m for m in sys.modules if m.startswith('tensordict')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.splitlines() == [f"{name} []" for name in LEAN_IMPORTS.values()]


def test_the_package_names_resolve_on_first_use() -> None:
    import transferqueue as tq

    assert set(tq.__all__) == set(tq._EXPORTS)  # one table says where each name lives
    assert set(tq.__all__) <= set(dir(tq))
    for name in tq.__all__:
        assert getattr(tq, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tq.nope  # noqa: B018
