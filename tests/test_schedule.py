"""Weight, start/end window and block choice (idadapter_core/schedule.py), and the K/V shift the ComfyUI host uses
for the trained cross-attention differences."""
import math

import pytest
import torch

from idadapter_core import PRESETS
from idadapter_core.errors import IDAdapterError
from idadapter_core.idadapter.adapter import CrossAttentionKV
from idadapter_core.schedule import AdapterStrength, StepWindow, adapter_blocks, check_schedule, require_finite


def test_weight_scales_adapter_and_kv_unless_in_the_papers_form():
    assert (AdapterStrength(0.6).adapter_scale, AdapterStrength(0.6).kv_scale) == (0.6, 0.6)
    assert AdapterStrength(0.0).is_off
    paper = AdapterStrength(0.0, kv_follows_weight=False)
    assert (paper.adapter_scale, paper.kv_scale, paper.is_off) == (0.0, 1.0, False)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_by_name(value):
    with pytest.raises(IDAdapterError, match=f"weight is {value}; it must be a finite number"):
        AdapterStrength(value)
    with pytest.raises(IDAdapterError, match=f"end_at is {value}"):
        check_schedule(0.0, value)
    with pytest.raises(IDAdapterError, match=f"threshold is {value}"):
        require_finite(threshold=value)


def test_start_after_end_is_refused_once():
    with pytest.raises(IDAdapterError, match=r"start_at \(0.8\) is after end_at \(0.2\)"):
        check_schedule(0.8, 0.2)
    check_schedule(0.3, 0.3)


def test_window_reads_each_steps_sigma_once():
    window = StepWindow(sigma_start=10.0, sigma_end=2.0)
    inside, outside = torch.tensor([5.0, 5.0]), torch.tensor([1.0, 1.0])
    assert window.contains(inside) and not window.contains(outside) and window.contains(None)
    outside.fill_(5.0)  # the same tensor object: the answer kept for the step is reused, not read again
    assert not window.contains(outside)
    window.reset()
    assert window.contains(outside)


def test_faster_mode_leaves_out_the_highest_resolution_blocks():
    sd15, sdxl = PRESETS["sd15"], PRESETS["sdxl"]
    assert adapter_blocks(sd15, "all") == frozenset(range(16))
    fast = adapter_blocks(sd15, "skip highest resolution")
    assert sorted(fast) == [i for i, c in enumerate(sd15.block_channels) if c != 320] and len(fast) == 11
    assert len(adapter_blocks(sdxl, "skip highest resolution")) == 60  # the 10 blocks at 640 channels left out
    with pytest.raises(IDAdapterError, match="unknown block mode 'some'"):
        adapter_blocks(sd15, "some")


@pytest.mark.parametrize("scale", [1.0, 0.5, -0.7])
def test_kv_shift_equals_projecting_with_the_shifted_weights(scale):
    g = torch.Generator().manual_seed(0)
    kv = CrossAttentionKV(32, 24)
    with torch.no_grad():
        kv.to_k.diff.normal_(generator=g)
        kv.to_v.diff.normal_(generator=g)
    w_k, w_v = torch.randn(32, 24, generator=g), torch.randn(32, 24, generator=g)
    context, value = torch.randn(2, 7, 24, generator=g), torch.randn(2, 7, 24, generator=g)
    k, v = kv.shift(context @ w_k.T, value @ w_v.T, context, value, scale)
    torch.testing.assert_close(k, context @ (w_k + scale * kv.to_k.diff).T)
    torch.testing.assert_close(v, value @ (w_v + scale * kv.to_v.diff).T)
