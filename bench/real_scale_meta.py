"""One training step counted on the meta device (bench/real_scale.py, step 3): FLOPs and saved-for-backward bytes
of SD1.5, SD2.1 and SDXL with each method's adapter, the face-ID gate's VAE decode, and a full-UNet training step
(the utilisation reference)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import BASES, GIB, NUM_REFS, SD_VAE, VIT_H_14_OPENCLIP as VIT_H, count_flops
from bench.real_scale_run import Settings
from train.real_size_models import TEXT_TOKENS


class AttentionMatrices(TorchDispatchMode):
    """Records the storages of attention probabilities: softmax outputs and the copies and views made of them. On the
    meta device attention runs as matmuls around a softmax and saves these (B, heads, queries, keys) matrices, which
    the fused kernels of CPUs and GPUs (flash, memory-efficient) recompute instead of keeping."""

    DERIVED = ("_to_copy", "clone", "view", "_unsafe_view", "expand", "reshape", "contiguous", "transpose", "t")

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        derived = name in self.DERIVED and any(
            torch.is_tensor(a) and a.untyped_storage()._cdata in self.storages for a in args)
        if (name in ("_softmax", "_safe_softmax") or derived) and torch.is_tensor(out):
            self.storages.add(out.untyped_storage()._cdata)
        return out


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (activations), each storage once, parameters excluded, and
    attention probabilities excluded unless `keep_attention` (`AttentionMatrices`)."""

    def __init__(self, exclude: list[torch.Tensor], keep_attention: bool = False) -> None:
        self.excluded = {p.untyped_storage()._cdata for p in exclude}
        self.attention = AttentionMatrices()
        self.keep_attention = keep_attention
        self.seen: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        attention_matrix = not self.keep_attention and key in self.attention.storages
        if key not in self.excluded and not attention_matrix:
            self.seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def gib(self) -> float:
        return sum(self.seen.values()) / GIB


def meta_step(base: str, resolution: int, batch: int = 1, dtype: torch.dtype = torch.float32,
              method: str = "idadapter", full_unet: bool = False) -> dict:
    """One training step's UNet part on the meta device: the adapter's encoders (IDAdapter: MFF + identity MLP on
    N ViT-H references), the UNet with the method's binding, MSE, backward. Returns its FLOPs (count_flops) and the
    saved-for-backward bytes, and the parameter counts. `full_unet`: the UNet trained itself, no adapter (the
    utilisation reference). Text encoders are left out here (77 tokens: < 1 % of the step, train_throughput)."""
    from diffusers import UNet2DConditionModel

    from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig
    from idadapter_core.hosts import DiffusersIDAdapter, DiffusersInvAdapter, layout_from_diffusers_unet
    from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig

    spec = BASES[base]
    meta = torch.device("meta")
    latent = resolution // 8
    context_dim = sum(t["hidden_size"] for t in spec.texts)
    widths = {"l": spec.texts[0]["hidden_size"]} if len(spec.texts) == 1 else {
        "l": spec.texts[0]["hidden_size"], "g": spec.texts[1]["hidden_size"]}
    with meta:
        unet = UNet2DConditionModel(**dict(spec.unet, sample_size=latent)).to(dtype)
        unet_params = sum(p.numel() for p in unet.parameters())
        layout = layout_from_diffusers_unet(unet, text_widths=widths)
        patches = (VIT_H["image_size"] // VIT_H["patch_size"]) ** 2
        if method == "idadapter":
            adapter = IDAdapter(IDAdapterConfig(layout=layout, num_refs=NUM_REFS, clip_embed_dim=VIT_H["projection_dim"],
                                                mff=MFFConfig(clip_dim=VIT_H["hidden_size"], face_dim=512,
                                                              num_patches=patches)))
        else:
            adapter = InvAdapter(InvAdapterConfig(layout))
    adapter.to(dtype)  # on the meta device there is no autocast: everything in `dtype`
    unet.requires_grad_(full_unet)
    adapter.requires_grad_(not full_unet)
    added = None
    if "addition_embed_type" in spec.unet:
        added = {"text_embeds": torch.randn(batch, spec.texts[1]["projection_dim"], device=meta, dtype=dtype),
                 "time_ids": torch.randn(batch, 6, device=meta, dtype=dtype)}
    context = torch.randn(batch, TEXT_TOKENS, context_dim, device=meta, dtype=dtype, requires_grad=not full_unet)
    noisy = torch.randn(batch, 4, latent, latent, device=meta, dtype=dtype)
    timesteps = torch.full((batch,), 500, device=meta)
    if full_unet:
        binding = None
    elif method == "idadapter":
        binding = DiffusersIDAdapter(unet, adapter)
    else:
        binding = DiffusersInvAdapter(unet, adapter)
    saved = SavedBytes([*unet.parameters(), *adapter.parameters()])

    def step() -> None:
        with saved.attention, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            if binding is not None and method == "idadapter":
                embeds = adapter.encode(
                    torch.randn(batch, NUM_REFS, patches, VIT_H["hidden_size"], device=meta, dtype=dtype),
                    torch.randn(batch, NUM_REFS, 512, device=meta, dtype=dtype),
                    torch.randn(batch, NUM_REFS, VIT_H["projection_dim"], device=meta, dtype=dtype))
                binding.set_identity(embeds.reference_tokens)
            elif binding is not None:
                with torch.no_grad():  # the reference pass records each block's self-attention input
                    binding.set_reference(binding.record_reference(noisy, timesteps, context.detach(),
                                                                   added_cond_kwargs=added))
            out = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(out.float(), torch.randn(out.shape, device=meta)).backward()

    flops = count_flops(step)
    return dict(gflops=flops / 1e9, saved_gib=saved.gib, unet_params=unet_params,
                adapter_params=sum(p.numel() for p in adapter.parameters()))


def vae_decode_gflops(resolution: int) -> float:
    """The face-ID gate's decode of x̂0 (forward, batch 1), counted on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(sample_size=resolution, **SD_VAE).requires_grad_(False)
        latents = torch.randn(1, 4, resolution // 8, resolution // 8)
    with torch.no_grad():
        return count_flops(lambda: vae.decode(latents)) / 1e9


def decode_saved_gib(resolution: int) -> float:
    """The face-ID loss's decode with gradients (fp32, as the trainer keeps the VAE), batch 1: saved-for-backward
    bytes counted on the meta device, all of them (its one attention matrix, 4096² at 512 px, included)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(sample_size=resolution, **SD_VAE).requires_grad_(False)
        latents = torch.randn(1, 4, resolution // 8, resolution // 8, requires_grad=True)
    saved = SavedBytes(list(vae.parameters()), keep_attention=True)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        vae.decode(latents).sample.mean().backward()
    return saved.gib


def count_on_meta(settings: Settings) -> dict:
    """FLOPs and saved bytes of every base at its resolution, and the utilisation reference."""
    counted: dict = {}
    for base, spec in BASES.items():
        res = settings.resolution if base == settings.base else spec.resolution
        entry = counted[base] = {"resolution": res, "decode_gflops": vae_decode_gflops(res),
                                 "decode_saved_gib_fp32": decode_saved_gib(res)}
        for method in settings.methods:
            entry[method] = {dtype_name: meta_step(base, res, 1, dtype, method)
                             for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        if base == settings.base:
            entry["half_resolution_fp32"] = meta_step(base, res // 2, 1, torch.float32, settings.methods[0])
    counted["reference_full_unet_sd21_512"] = meta_step("sd21", 512, 1, torch.bfloat16, full_unet=True)
    return counted
