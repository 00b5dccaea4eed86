"""A self-contained run of the IDAdapter core on tiny random models, CPU, under a minute.

It does what a training step and an inference call do, end to end, with nothing downloaded:
face/CLIP features -> MFF + identity token -> adapters in a diffusers UNet (+ E_c spliced into a CLIP
text encoder) -> diffusion loss -> Adam steps -> weights saved, reloaded bit-exact and applied.

    python -m train.demo [--steps 30] [--out demo_output]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig, load_idadapter, save_idadapter, splice_identity_token
from idadapter_core.hosts import DiffusersIDAdapter, layout_from_diffusers_unet

TRIGGER_ID = 7


def build_models(seed: int):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    layout = layout_from_diffusers_unet(unet)
    config = IDAdapterConfig(
        layout=layout, mff=MFFConfig(clip_dim=48, face_dim=16, num_patches=16, width=32, heads=4),
        clip_embed_dim=24, num_refs=4, clip_vision="tiny-demo", face_model="tiny-demo", class_word="person",
    )
    return unet, text_encoder, DDPMScheduler(num_train_timesteps=1000), IDAdapter(config)


def encode_prompt(text_encoder, token_ids: torch.Tensor, identity_token: torch.Tensor) -> torch.Tensor:
    """Run the text encoder with the trigger token's input embedding replaced by E_c (docs/DESIGN.md §2.3)."""
    hook = text_encoder.get_input_embeddings().register_forward_hook(
        lambda module, args, out: splice_identity_token(out, args[0], TRIGGER_ID, identity_token)
    )
    try:
        return text_encoder(token_ids).last_hidden_state
    finally:
        hook.remove()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    unet, text_encoder, scheduler, adapter = build_models(args.seed)
    config = adapter.config
    mff = config.mff
    g = torch.Generator().manual_seed(args.seed)
    # One identity: N reference feature sets and a fixed "image" of that person (random latents here).
    clip_patches = torch.randn(2, config.num_refs, mff.num_patches, mff.clip_dim, generator=g)
    face_embeds = F.normalize(torch.randn(2, config.num_refs, mff.face_dim, generator=g), dim=-1)
    clip_image_embeds = torch.randn(2, config.num_refs, config.clip_embed_dim, generator=g)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    token_ids = torch.tensor([[1, 5, 9, 11, TRIGGER_ID, 2, 0, 0]] * 2)

    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-3)
    binding = DiffusersIDAdapter(unet, adapter)
    losses = []
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.tensor([400, 600])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    for _ in tqdm(range(args.steps), desc="IDAdapter demo training"):
        embeds = adapter.encode(clip_patches, face_embeds, clip_image_embeds)
        binding.set_identity(embeds.reference_tokens)
        context = encode_prompt(text_encoder, token_ids, embeds.identity_tokens["l"])
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    binding.detach()

    weights = args.out / "idadapter-demo.safetensors"
    save_idadapter(weights, adapter)
    reloaded = load_idadapter(weights, model_layout=config.layout)
    exact = all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), reloaded.state_dict().values()))
    with torch.no_grad(), DiffusersIDAdapter(unet, reloaded) as applied:
        embeds = reloaded.encode(clip_patches, face_embeds, clip_image_embeds)
        applied.set_identity(embeds.reference_tokens)
        context = encode_prompt(text_encoder, token_ids, embeds.identity_tokens["l"])
        reloaded_loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=context).sample, noise).item()

    print(f"trainable parameters: {sum(p.numel() for p in adapter.parameters()):,}")
    print(f"diffusion loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")
    print(f"weights: {weights} ({weights.stat().st_size / 1e6:.2f} MB), reload bit-exact: {exact}")
    print(f"loss with the reloaded weights: {reloaded_loss:.4f}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
