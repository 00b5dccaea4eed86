"""Where and on which half of guidance Apply IDAdapter and Apply Inv-Adapter act, inside a real ComfyUI (COMFYUI_PATH;
skipped without it). Region masks: a mask of ones is no mask, zeros the unpatched model, a half mask changes only its
half of every transformer block's tokens, masks of any size are resized, unusable masks are refused, and two chained
Apply nodes (either method) each act in their own region. Guidance over the identity: CFG's negative chunks get
exactly the null identity, the positive ones exactly what they get without it."""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, replace

import pytest
import torch

from comfy_fixtures import (
    TINY_SD15_LAYOUT, comfy_model_tree, fake_features, tiny_adapter_config, write_adapter, write_inv_adapter,
)

pytestmark = pytest.mark.comfyui

LATENT_HW = (8, 12)
"""A landscape latent (64x96 px), so that the token grids follow an aspect ratio other than 1."""
METHODS = ("idadapter", "inv_adapter")


@pytest.fixture(scope="module")
def host(comfy_pack, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("comfy_mask_models")
    model, clip, vae = comfy_model_tree(root, "idadapter")
    (root / "inv_adapter").mkdir()
    folder_paths.add_model_folder_path("inv_adapter", str(root / "inv_adapter"), is_default=True)
    write_adapter(root / "idadapter" / "tiny.safetensors", tiny_adapter_config(), seed=0, kv_scale=0.02)
    write_inv_adapter(root / "inv_adapter" / "trained.safetensors")
    id_nodes = importlib.import_module("comfyui_idadapter.nodes.idadapter_nodes")
    inv_nodes = importlib.import_module("comfyui_idadapter.nodes.inv_adapter_nodes")

    adapter = id_nodes.LoadIDAdapter.execute("tiny.safetensors").result[0]
    embeds = [id_nodes.EncodeIdentity.execute(adapter, fake_features(adapter.config, seed)).result[0] for seed in (0, 1)]
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    inv_adapter = inv_nodes.LoadInvAdapter.execute("trained.safetensors").result[0]
    reference = inv_nodes.InvertReference.execute(model, vae, clip, image, 3).result[0]
    return dict(model=model, clip=clip, id_nodes=id_nodes, inv_nodes=inv_nodes, adapter=adapter, embeds=embeds,
                inv_adapter=inv_adapter, reference=reference)


def apply(host, method: str, mask=None, model=None, embeds=None, **options):
    model = model or host["model"]
    if method == "idadapter":
        node = host["id_nodes"].ApplyIDAdapter
        embeds = embeds or host["embeds"][0]
        return node.execute(model, host["adapter"], embeds, 1.0, 0.0, 1.0, mask=mask, **options).result[0]
    node = host["inv_nodes"].ApplyInvAdapter
    return node.execute(model, host["inv_adapter"], host["reference"], 1.0, 0.0, 1.0, mask=mask, **options).result[0]


def sample(model, clip, steps: int = 2, cfg: float = 7.0):
    import comfy.sample

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a man"))
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, *LATENT_HW)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", cond, uncond, latent, seed=0,
                               disable_pbar=True)


def left_half(height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(1, height, width)
    mask[..., : width // 2] = 1.0
    return mask


@pytest.mark.parametrize("method", METHODS)
def test_a_mask_of_ones_is_no_mask_and_a_mask_of_zeros_the_unpatched_model(host, method):
    clip = host["clip"]
    bare = sample(host["model"], clip)
    unmasked = sample(apply(host, method), clip)
    assert (unmasked - bare).abs().max() > 1e-3
    for size in (LATENT_HW, (64, 96), (5, 7)):  # the latent's size, the image's, and another
        assert torch.equal(sample(apply(host, method, torch.ones(size)), clip), unmasked), size
        assert torch.equal(sample(apply(host, method, torch.zeros(1, *size)), clip), bare), size


@dataclass
class BlockCheck:
    tokens: int
    inside: float
    """max |patched − unpatched| over the block's tokens inside the mask, for the same block input"""
    outside: float
    outside_equal: bool


class BlockRecorder:
    """Forward hooks on every transformer block of the UNet: each call during sampling at the generation's latent
    size reruns the block on the same input with the patches in `reference_options` (None: none, the unpatched
    block) and compares the two outputs inside (the left half of the block's token grid) and outside the mask."""

    def __init__(self, model, reference_options: dict | None = None) -> None:
        from comfy.ldm.modules.attention import BasicTransformerBlock

        self.reference_options = reference_options
        self.checks: list[BlockCheck] = []
        self._rerunning = False
        unet = model.get_model_object("diffusion_model")
        self.handles = [
            module.register_forward_hook(self._hook, with_kwargs=True)
            for module in unet.modules() if isinstance(module, BasicTransformerBlock)
        ]

    def _hook(self, block, args, kwargs, output):
        from idadapter_core.masks import token_grid

        options = kwargs["transformer_options"]
        if self._rerunning or tuple(options["original_shape"][-2:]) != LATENT_HW:
            return  # Inv-Adapter's reference pass runs on the (square) reference latent
        rerun_options = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
        if self.reference_options is not None:
            rerun_options.update(self.reference_options)
        self._rerunning = True
        try:
            with torch.no_grad():
                reference = block(args[0], context=kwargs.get("context"), transformer_options=rerun_options)
        finally:
            self._rerunning = False
        tokens = output.shape[1]
        rows, columns = token_grid(LATENT_HW, tokens)
        inside = torch.zeros(rows, columns, dtype=torch.bool)
        inside[:, : columns // 2] = True
        inside = inside.flatten()
        diff = (output - reference).abs()
        self.checks.append(BlockCheck(tokens, float(diff[:, inside].max()), float(diff[:, ~inside].max()),
                                      torch.equal(output[:, ~inside], reference[:, ~inside])))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


NUM_BLOCKS = TINY_SD15_LAYOUT.num_blocks


@pytest.mark.parametrize("mask_hw", [LATENT_HW, (64, 96), (24, 36)])
@pytest.mark.parametrize("method", METHODS)
def test_a_half_mask_changes_only_its_half_of_every_blocks_tokens(host, method, mask_hw):
    patched = apply(host, method, left_half(*mask_hw))
    recorder = BlockRecorder(patched)
    try:
        sample(patched, host["clip"])
    finally:
        recorder.remove()
    assert len(recorder.checks) == 2 * NUM_BLOCKS  # every block at both steps
    for check in recorder.checks:
        assert check.outside_equal, check
        assert check.inside > 1e-4, check


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mask,expected", [
    ("left", "mask must be a MASK .* got str"),
    (torch.zeros(1, 0, 8), r"mask is empty \(shape \(1, 0, 8\)\)"),
    (torch.full((8, 8), float("nan")), "mask holds NaN or infinite values"),
    (torch.zeros(1, 4, 8, 8), r"mask has shape \(1, 4, 8, 8\); a MASK is \(H, W\) or \(B, H, W\)"),
])
def test_unusable_masks_are_refused_with_a_clear_message(host, method, mask, expected):
    pack_error = importlib.import_module("comfyui_idadapter.idadapter_core.errors").IDAdapterError
    with pytest.raises(pack_error, match=expected):
        apply(host, method, mask)


def count_adapter_calls(adapter) -> tuple[list[int], list]:
    calls = []
    handles = [block.ff.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, block in enumerate(adapter.model.blocks)]
    return calls, handles


def test_two_chained_apply_idadapter_each_act_in_their_own_region(host):
    """Person A on the left, person B on the right, on one MODEL: both middle patches run and both K/V patches
    chain; per block, the left tokens are exactly what A alone (left-masked) makes of the block's input, while
    the right half is B's (it differs from A alone there)."""
    left = left_half(64, 96)
    person_a = apply(host, "idadapter", left, embeds=host["embeds"][0])
    both = apply(host, "idadapter", 1.0 - left, model=person_a, embeds=host["embeds"][1])
    options = both.model_options["transformer_options"]
    assert len(options["patches"]["middle_patch"]) == 2
    chained = next(iter(options["patches_replace"]["attn2"].values()))
    assert type(chained.inner).__name__ == "ChainedReplace"  # B's K/V patch hands on to A's

    calls, handles = count_adapter_calls(host["adapter"])
    a_only = person_a.model_options["transformer_options"]
    recorder = BlockRecorder(both, {"patches": a_only["patches"], "patches_replace": a_only["patches_replace"]})
    try:
        sample(both, host["clip"], steps=1)
    finally:
        recorder.remove()
        for handle in handles:
            handle.remove()
    # each block's adapter ran for A and for B, plus once more in the recorder's rerun with A alone
    assert calls == [i for i in range(NUM_BLOCKS) for _ in range(3)]
    assert len(recorder.checks) == NUM_BLOCKS
    for check in recorder.checks:
        assert check.inside == 0.0, check  # left: A alone
        assert check.outside > 1e-4, check  # right: B acts there


def test_two_chained_apply_inv_adapter_with_complementary_masks_are_one_unmasked_apply(host):
    """Two Apply Inv-Adapter on one MODEL, left and right half, each with the same reference: every token gets the
    EAA exactly once, so the result is one unmasked Apply's (both reference passes and both EAA chains ran; a mask
    leaking, or one Apply shadowing the other, would add or miss the EAA's whole effect somewhere). Equal up to float
    rounding, not bit for bit: the unmasked Apply takes its rows' own self-attention from the EAA's kernel, the
    masked ones (and a chained one) from ComfyUI's, the same attention computed in another order."""
    left = left_half(64, 96)
    both = apply(host, "inv_adapter", 1.0 - left, model=apply(host, "inv_adapter", left))
    wrappers = both.wrappers[next(iter(both.wrappers))]
    assert len(next(iter(wrappers.values()))) == 2
    chained, single = sample(both, host["clip"]), sample(apply(host, "inv_adapter"), host["clip"])
    effect = (single - sample(host["model"], host["clip"])).abs().max()
    assert effect > 1.0
    assert (chained - single).abs().max() < 1e-3 * effect


NEGATIVE_IDENTITY = dict(guided="none (guided)", same="same as positive")


def null_identity_model(host, method: str, mask=None):
    """What the weights were trained to see without an identity: IDAdapter with E_r = 0 (identity dropout; the trained
    K/V stay, confined to the mask), Inv-Adapter's model without the EAA."""
    if method == "inv_adapter":
        return host["model"]
    embeds = host["embeds"][0]
    null = replace(embeds, reference_tokens=torch.zeros_like(embeds.reference_tokens))
    return apply(host, method, mask, embeds=null, identity_in_negative=NEGATIVE_IDENTITY["same"])


def cfg_batch_output(model, cond_or_uncond: list[int], sigma: float = 5.0) -> torch.Tensor:
    """One UNet call on a batch of one chunk per entry of `cond_or_uncond` (0 positive, 1 negative: the same latent
    in every chunk, a context per kind), with the transformer options a sampler passes; the chunks stacked."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 4, *LATENT_HW, generator=g)
    contexts = torch.randn(2, 77, 768, generator=g)
    x = latent.repeat(len(cond_or_uncond), 1, 1, 1)
    context = contexts[cond_or_uncond]
    sigmas = torch.full((len(cond_or_uncond),), sigma)
    options = {**model.model_options["transformer_options"], "sigmas": sigmas, "cond_or_uncond": list(cond_or_uncond),
               "wrappers": model.wrappers}  # as a sampler passes them (Inv-Adapter's reference pass is one)
    with torch.no_grad():
        return model.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=options)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunks", [[0, 1], [1, 0], [1], [0, 0, 1]])
@pytest.mark.parametrize("masked", [False, True])
def test_guidance_over_the_identity_gives_the_negative_chunks_the_null_identity_exactly(host, method, chunks, masked):
    mask = left_half(*LATENT_HW) if masked else None
    guided = cfg_batch_output(apply(host, method, mask), chunks)
    same = cfg_batch_output(apply(host, method, mask, identity_in_negative=NEGATIVE_IDENTITY["same"]), chunks)
    null = cfg_batch_output(null_identity_model(host, method, mask), chunks)
    for chunk, kind in enumerate(chunks):
        assert torch.equal(guided[chunk], (null if kind else same)[chunk]), (chunk, kind)
    negative = chunks.index(1)
    assert (same[negative] - null[negative]).abs().max() > 1e-4  # the identity did act on the negative chunk before


@pytest.mark.parametrize("method", METHODS)
def test_guided_and_same_identity_differ_under_cfg_and_agree_at_cfg_1(host, method):
    """At cfg 1 ComfyUI skips the negative half, so the option cannot matter; at cfg 7 it does."""
    guided, same = apply(host, method), apply(host, method, identity_in_negative=NEGATIVE_IDENTITY["same"])
    assert torch.equal(sample(guided, host["clip"], cfg=1.0), sample(same, host["clip"], cfg=1.0))
    assert (sample(guided, host["clip"]) - sample(same, host["clip"])).abs().max() > 1e-4


def test_unknown_negative_identity_mode_is_refused_naming_the_choices(host):
    with pytest.raises(Exception, match="none \\(guided\\), same as positive"):
        apply(host, "idadapter", identity_in_negative="both")


@pytest.mark.parametrize("method", METHODS)
def test_a_mask_outside_0_1_is_clamped(host, method):
    """A bicubic-resized mask overshoots (-0.11 ... 1.11): it acts as the mask clamped to [0, 1], never turning the
    adapter negative nor past full strength."""
    overshooting = left_half(64, 96) * 1.22 - 0.11
    clamped = sample(apply(host, method, left_half(64, 96)), host["clip"])
    assert torch.equal(sample(apply(host, method, overshooting), host["clip"]), clamped)


@pytest.mark.parametrize("method", METHODS)
def test_a_mask_batch_that_fits_no_latent_batch_says_what_would(host, method):
    pack_error = importlib.import_module("comfyui_idadapter.idadapter_core.errors").IDAdapterError
    patched = apply(host, method, torch.ones(2, *LATENT_HW))
    with pytest.raises(pack_error, match=r"the mask holds 2 masks but the latent batch holds 1 image; give a single "
                                         r"mask \(a batch of 1\)\.$"):
        sample(patched, host["clip"], steps=1)


@pytest.mark.parametrize("method,node", [("idadapter", "Apply IDAdapter"), ("inv_adapter", "Apply Inv-Adapter")])
def test_an_all_zero_mask_is_a_warning_naming_the_node_and_the_likely_cause(host, method, node, caplog):
    with caplog.at_level(logging.WARNING):
        apply(host, method, torch.zeros(64, 64))  # Load Image's MASK of an image without transparency
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{node}: the mask is 0 everywhere")
    assert "Load Image's MASK of an image without transparency" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        apply(host, method, left_half(64, 64))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
