"""ComfyUI entry point of the IDAdapter node pack.

ComfyUI imports this package from `custom_nodes/` and calls `comfy_entrypoint()`. The node modules
import ComfyUI, so they are imported only here, which keeps this file importable without the host.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comfy_api.latest import ComfyExtension

WEB_DIRECTORY = "./web"
"""Served by ComfyUI at /extensions/<this folder's name>/; the frontend's node help reads web/docs/<node id>.md."""


async def comfy_entrypoint() -> ComfyExtension:
    from .nodes import IDAdapterExtension

    return IDAdapterExtension()
