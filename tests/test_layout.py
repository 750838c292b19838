"""The house rules of docs/ARCHITECTURE.md, checked on the source: which room imports what,
and no module past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"
# Rooms below the API: they must run without a web framework.
BELOW_API = ("models", "backends", "pipeline", "watchdog")
MAX_LINES = 400


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules(*rooms: str) -> list[Path]:
    return sorted(p for room in rooms for p in (PACKAGE / room).rglob("*.py"))


def test_nothing_below_the_api_imports_aiohttp_or_the_api() -> None:
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(
            m for m in imports(p) if m.split(".")[0] == "aiohttp" or m.startswith("appliance.api")
        )
        for p in modules(*BELOW_API)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_pipeline_does_not_import_the_backends() -> None:
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in modules("pipeline")
        if any(m.startswith("appliance.backends") for m in imports(p))
    ]
    assert offenders == []


def test_wire_types_need_no_web_framework() -> None:
    for name in ("wire.py", "stream_protocol.py"):
        found = imports(PACKAGE / "api" / name)
        assert not any(m.split(".")[0] == "aiohttp" for m in found), name
        api = {m for m in found if m.startswith("appliance.api")}
        assert api <= {"appliance.api.wire"}, (name, api)


def test_every_app_key_lives_in_state() -> None:
    defined = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "web.AppKey(" in p.read_text()
    }
    assert defined == {"api/state.py"}


def test_every_module_stays_small() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}
