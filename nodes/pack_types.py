"""The node category and the custom socket types this pack's nodes pass between each other."""
from comfy_api.latest import io

CATEGORY = "IDAdapter"

IDAdapterType = io.Custom("IDADAPTER")
FaceFeaturesType = io.Custom("FACE_FEATURES")
IDEmbedsType = io.Custom("ID_EMBEDS")
InvAdapterType = io.Custom("INV_ADAPTER")
InvReferenceType = io.Custom("INV_REFERENCE")
