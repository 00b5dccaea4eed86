"""ComfyUI nodes of the pack (V3 schema). Thin: each node routes tensors into `idadapter_core`."""
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .evaluation_nodes import FaceSimilarity
from .face_nodes import FACE_NODES
from .idadapter_nodes import IDADAPTER_NODES
from .inv_adapter_nodes import INV_ADAPTER_NODES


class IDAdapterExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*FACE_NODES, *IDADAPTER_NODES, FaceSimilarity, *INV_ADAPTER_NODES]
