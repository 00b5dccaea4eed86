"""Weights file: bit-exact round trip, metadata, and one clear message per kind of bad file."""
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_adapter
from idadapter_core import PRESETS, IncompatibleWeightsError, WeightsFormatError, load_idadapter, save_idadapter
from idadapter_core.presets import UNetLayout
from idadapter_core.idadapter.files import idadapter_metadata
from idadapter_core.weights import read_weights, write_weights

TINY_LAYOUT = UNetLayout("custom", (16, 32, 32), (4, 4, 4), 24, {"l": 24})


@pytest.fixture
def saved(tmp_path):
    adapter = tiny_adapter(TINY_LAYOUT, open_gates=True, class_word="woman")
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "adapter.safetensors"
    save_idadapter(path, adapter)
    return adapter, path


def test_round_trip_is_bit_exact_with_metadata(saved):
    adapter, path = saved
    loaded = load_idadapter(path, model_layout=TINY_LAYOUT)
    original, reloaded = adapter.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert loaded.config == adapter.config
    _, metadata = read_weights(path, "idadapter")
    assert metadata["format"] == "idadapter" and metadata["format_version"] == "1"
    assert metadata["base"] == "custom" and metadata["class_word"] == "woman" and metadata["trigger_word"] == "sks"
    assert json.loads(metadata["block_channels"]) == [16, 32, 32]
    assert metadata["face_embed_dim"] == "8" and metadata["num_refs"] == "2" and metadata["num_ref_tokens"] == "9"
    assert {"context_dim", "clip_vision", "face_model"} <= metadata.keys()


def test_tensor_names_follow_the_documented_groups(saved):
    tensors, _ = read_weights(saved[1], "idadapter")
    prefixes = {name.split(".")[0] for name in tensors}
    assert prefixes == {"mff", "id_token", "blocks", "cross_kv"}
    assert "cross_kv.2.to_v.diff" in tensors and "blocks.0.alpha_attn" in tensors


def test_full_size_preset_validates_against_its_preset(tmp_path):
    """SD1.5's 16 full-size blocks (a tiny MFF keeps the file small), saved in fp16."""
    adapter = tiny_adapter(PRESETS["sd15"])
    path = tmp_path / "sd15.safetensors"
    save_idadapter(path, adapter, dtype=torch.float16)
    loaded = load_idadapter(path)  # no model given: checked against the sd15 preset
    assert loaded.config.layout == PRESETS["sd15"]
    assert next(loaded.blocks.parameters()).dtype == torch.float16
    with pytest.raises(IncompatibleWeightsError, match=r"for sd15 \(context 768, 16 transformer blocks\), but the model is sdxl \(context 2048, 70"):
        load_idadapter(path, model_layout=PRESETS["sdxl"])


def test_write_is_atomic(tmp_path, saved):
    _, path = saved
    before = path.read_bytes()
    with pytest.raises(AttributeError):  # fails while writing
        write_weights(path, {"x": "not a tensor"}, {"format": "idadapter"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_refuses_a_pickle_without_unpickling_it(tmp_path):
    path = tmp_path / "evil.safetensors"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Evil(), protocol=4))
    with pytest.raises(WeightsFormatError, match="is a Python pickle, not safetensors"):
        load_idadapter(path)
    assert not marker.exists()


def test_refuses_a_torch_zip_checkpoint(tmp_path):
    path = tmp_path / "adapter.bin"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(WeightsFormatError, match="PyTorch zip checkpoint, not safetensors"):
        load_idadapter(path)


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsFormatError, match=r"truncated: expected \d+ bytes, found \d+"):
        load_idadapter(path)
    path.write_bytes(data[:20])
    with pytest.raises(WeightsFormatError, match="truncated: its header needs"):
        load_idadapter(path)
    path.write_bytes(b"")
    with pytest.raises(WeightsFormatError, match="empty or truncated"):
        load_idadapter(path)


def test_random_bytes_and_missing_file(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"this is not json")
    with pytest.raises(WeightsFormatError, match="header is not JSON"):
        load_idadapter(path)
    with pytest.raises(WeightsFormatError, match="weights file not found"):
        load_idadapter(tmp_path / "nope.safetensors")


def test_safetensors_of_another_kind(tmp_path):
    path = tmp_path / "ip-adapter.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(WeightsFormatError, match="without adapter metadata.*expected 'idadapter'"):
        load_idadapter(path)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "inv-adapter", "format_version": "1"})
    with pytest.raises(WeightsFormatError, match="is a 'inv-adapter' file; expected 'idadapter'"):
        load_idadapter(path)


def test_newer_format_version(saved, tmp_path):
    adapter, _ = saved
    path = tmp_path / "future.safetensors"
    metadata = idadapter_metadata(adapter.config) | {"format_version": "7"}
    write_weights(path, adapter.state_dict(), metadata)
    with pytest.raises(WeightsFormatError, match="format_version '7'.*Update the pack"):
        load_idadapter(path)


def test_unknown_base_needs_a_model(saved):
    _, path = saved
    with pytest.raises(IncompatibleWeightsError, match="unknown base 'custom'"):
        load_idadapter(path)


def test_wrong_tensor_shape(saved, tmp_path):
    adapter, _ = saved
    tensors = dict(adapter.state_dict())
    tensors["blocks.1.linear.weight"] = torch.zeros(3, 3)
    path = tmp_path / "tampered.safetensors"
    write_weights(path, tensors, idadapter_metadata(adapter.config))
    with pytest.raises(IncompatibleWeightsError, match=r"wrong shape for blocks.1.linear.weight: expected \(32, 20\), found \(3, 3\)"):
        load_idadapter(path, model_layout=TINY_LAYOUT)
    del tensors["blocks.1.linear.weight"]
    write_weights(path, tensors, idadapter_metadata(adapter.config))
    with pytest.raises(IncompatibleWeightsError, match="missing 1 tensors"):
        load_idadapter(path, model_layout=TINY_LAYOUT)


def test_identity_embeds_round_trip_and_provenance(tmp_path):
    from idadapter_core import IdentityEmbeds, load_identity_embeds, save_identity_embeds

    embeds = IdentityEmbeds(torch.randn(1, 9, 20), {"l": torch.randn(1, 24), "g": torch.randn(1, 32)}, "abc123", "a.safetensors")
    path = tmp_path / "me.safetensors"
    save_identity_embeds(path, embeds)
    loaded = load_identity_embeds(path)
    assert torch.equal(loaded.reference_tokens, embeds.reference_tokens)
    assert loaded.identity_tokens.keys() == {"l", "g"} and torch.equal(loaded.identity_tokens["g"], embeds.identity_tokens["g"])
    assert (loaded.adapter_fingerprint, loaded.adapter_name) == ("abc123", "a.safetensors")
    loaded.check_made_by("abc123", "a.safetensors")
    with pytest.raises(IncompatibleWeightsError, match="encoded with 'a.safetensors', not with 'b.safetensors'"):
        loaded.check_made_by("def456", "b.safetensors")
    with pytest.raises(WeightsFormatError, match="is a 'idadapter-embeds' file; expected 'idadapter'"):
        load_idadapter(path)


def test_file_fingerprint_tracks_content(saved, tmp_path):
    from idadapter_core.weights import file_fingerprint

    adapter, path = saved
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    assert file_fingerprint(copy) == file_fingerprint(path)
    with torch.no_grad():
        adapter.blocks[0].alpha_attn.add_(1.0)
    save_idadapter(copy, adapter)
    assert file_fingerprint(copy) != file_fingerprint(path)


def test_custom_base_can_wait_for_the_model(saved):
    _, path = saved
    assert load_idadapter(path, require_known_base=False).config.layout == TINY_LAYOUT


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor_is_refused_naming_it(tmp_path, value):
    from idadapter_core import IdentityEmbeds, load_identity_embeds, save_identity_embeds

    adapter = tiny_adapter(TINY_LAYOUT)
    with torch.no_grad():
        adapter.blocks[1].ff[1].weight[2, 3] = value
    save_idadapter(tmp_path / "bad.safetensors", adapter)
    with pytest.raises(WeightsFormatError, match="bad.safetensors has NaN or infinite values in tensor 'blocks.1.ff.1.weight'"):
        load_idadapter(tmp_path / "bad.safetensors", model_layout=TINY_LAYOUT)
    tokens = torch.zeros(1, 3, 20)
    tokens[0, 1, 2] = value
    save_identity_embeds(tmp_path / "embeds.safetensors", IdentityEmbeds(tokens, {"l": torch.zeros(1, 24)}))
    with pytest.raises(WeightsFormatError, match="tensor 'reference_tokens'"):
        load_identity_embeds(tmp_path / "embeds.safetensors")


def test_layouts_that_differ_say_how():
    from idadapter_core.presets import check_layout

    sd15 = PRESETS["sd15"]
    short = UNetLayout("SD15", (320, 640), (8, 8), 768, {"l": 768})
    with pytest.raises(IncompatibleWeightsError, match=r"16 vs 2 transformer blocks \(widths 320/640/1280 vs 320/640\)\); "
                                                       r"use IDAdapter weights trained for a UNet of this model's layout"):
        check_layout(sd15, short, "w.safetensors")
    with pytest.raises(IncompatibleWeightsError, match=r"heads 8 vs 5; text context width 768 vs 1024\); use IDAdapter weights trained for sd21"):
        check_layout(sd15, PRESETS["sd21"], "w.safetensors")
