"""Issue 12 item 2: the router uses the engine's front end (``pdserve.engine.frontend``) and the core's shared
contracts (``pdserve.engine.core``: block hashes, KV events; ``pdserve.engine.security``: the cluster secret that
signs calls to pods), never engine internals. Checked on the source, so a
new import that breaks the rule fails here, not in a reader's head."""

from __future__ import annotations

import ast
from pathlib import Path

import pdserve.services.router as router_pkg

ALLOWED = ("pdserve.engine.frontend", "pdserve.engine.core", "pdserve.engine.security")
# Known exceptions, each with its reason: the CLI resolves the model directory (config and tokenizer files) as an
# engine does; the KV-event subscriber decodes the engine publisher's wire format; the pod backend verifies a KV
# handle and releases a transfer no decode pod took over (the KV handle contract and its torch-free client); the
# CLI freezes its start-up heap as every pdserve server does (a torch-free helper).
EXCEPTIONS = {("cli.py", "pdserve.engine.model_loader"), ("cli.py", "pdserve.engine.heap"),
              ("kv_events.py", "pdserve.engine.kv_event_publisher"),
              ("backend.py", "pdserve.engine.kv_transfer.base"),
              ("backend.py", "pdserve.engine.kv_transfer.grpc.client")}


def engine_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("pdserve.engine"))
    return found


def test_the_router_imports_only_the_front_end_and_core_contracts() -> None:
    root = Path(router_pkg.__file__).parent
    bad = sorted((str(p.relative_to(root)), mod) for p in root.rglob("*.py") for mod in engine_imports(p)
                 if not mod.startswith(ALLOWED) and (str(p.relative_to(root)), mod) not in EXCEPTIONS)
    assert bad == []
