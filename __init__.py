"""ComfyUI entry point of the IDAdapter node pack.

ComfyUI imports this package from `custom_nodes/` and calls `comfy_entrypoint()`. The node modules
import ComfyUI, so they are imported only here, which keeps this file importable without the host.
"""


async def comfy_entrypoint():
    from .nodes import IDAdapterExtension

    return IDAdapterExtension()
