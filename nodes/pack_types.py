"""The node category, the custom socket types this pack's nodes pass between each other, and the inputs both Apply
nodes share."""
from comfy_api.latest import io

from ..idadapter_core.schedule import NEGATIVE_IDENTITY_MODES

CATEGORY = "IDAdapter"

IDAdapterType = io.Custom("IDADAPTER")
FaceFeaturesType = io.Custom("FACE_FEATURES")
IDEmbedsType = io.Custom("ID_EMBEDS")
InvAdapterType = io.Custom("INV_ADAPTER")
InvReferenceType = io.Custom("INV_REFERENCE")


def identity_in_negative_input() -> io.Combo.Input:
    """Apply's advanced `identity_in_negative`: guidance over the identity (the default) or the identity on both
    halves of classifier-free guidance (README, "Guidance over the identity")."""
    return io.Combo.Input(
        "identity_in_negative", options=list(NEGATIVE_IDENTITY_MODES), default=NEGATIVE_IDENTITY_MODES[0],
        optional=True, advanced=True,
        tooltip="'none (guided)': the negative prompt's half of each step gets no identity (as the weights were "
                "trained to see it), so the KSampler's cfg scales the identity too. 'same as positive': both halves "
                "get the identity, so cfg amplifies only the prompt.",
    )
