"""Every node of the pack has a help page where the frontend looks for it: `<WEB_DIRECTORY>/docs/<node id>.md`.
The node ids are read from the node modules' schemas here (no ComfyUI needed); the host test takes them from the
pack's entrypoint and fetches each page through ComfyUI's server."""
import ast
import importlib.util

import pytest

from conftest import REPO_ROOT

SECTIONS = ("## Inputs", "## Outputs", "## Typical graph", "## Errors")


def schema_node_ids() -> set[str]:
    """The `node_id` of every `io.Schema(...)` in nodes/*.py."""
    ids = set()
    for path in (REPO_ROOT / "nodes").glob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "Schema":
                ids.update(k.value.value for k in call.keywords if k.arg == "node_id")
    return ids


def web_directory():
    """The pack's WEB_DIRECTORY, read from its `__init__.py` (which imports nothing of ComfyUI at load time)."""
    spec = importlib.util.spec_from_file_location("pack_entry", REPO_ROOT / "__init__.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    return REPO_ROOT / entry.WEB_DIRECTORY


def test_every_node_has_exactly_one_help_page():
    pages = {page.stem for page in (web_directory() / "docs").glob("*.md")}
    assert {"IDAdapterApply", "InvAdapterApply"} <= schema_node_ids()
    assert pages == schema_node_ids()


@pytest.mark.parametrize("node_id", sorted(schema_node_ids()))
def test_help_page_says_what_the_node_does_its_sockets_a_graph_and_its_errors(node_id):
    text = (web_directory() / "docs" / f"{node_id}.md").read_text()
    assert text.startswith("# ")
    positions = [text.find(section) for section in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), (node_id, positions)
