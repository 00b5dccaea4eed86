"""Smoke test of bench/step_overhead.py on the tiny UNet: it runs end to end, and the instruments and real layouts
of bench/common.py count right. No timings are asserted (they are noise at this size)."""
import pytest
import torch
import torch.nn.functional as F

from bench import common
from bench import step_overhead as bench
from conftest import tiny_adapter
from idadapter_core.hosts import layout_from_diffusers_unet
from idadapter_core.presets import get_preset


def test_tensor_memory_counts_peak_and_frees():
    with common.TensorMemory() as memory:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2  # 4,000 more
        view = b[:10]  # no new storage; keeps b's alive
        a.add_(1)  # in place: no new storage
        del a, b
        kept = view + 1  # 40 bytes
    assert memory.peak == 8000
    assert memory.live == 4040
    del kept, view


def test_cpu_attention_flops_are_counted():
    q = torch.randn(2, 4, 16, 8)
    cost = common.instrumented(lambda: F.scaled_dot_product_attention(q, q, q))
    assert cost.flops == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # q·k and p·v, 2 x MACs each


@pytest.mark.parametrize("base, unet", [("sd15", common.SD15_UNET), ("sd21", common.SD21_UNET),
                                        ("sdxl", common.SDXL_UNET)])
def test_real_unet_layouts_are_the_presets(base, unet):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        layout = layout_from_diffusers_unet(UNet2DConditionModel(**unet))
    assert layout.same_shape_as(get_preset(base))


def test_benchmark_runs_end_to_end_on_the_tiny_unet(tiny_unet, capsys):
    adapter = tiny_adapter(layout_from_diffusers_unet(tiny_unet), open_gates=True)
    settings = bench.Settings(latent=8, ref_tokens=(9, 3), rounds=1, warmup=0)
    summary = bench.run_benchmark(tiny_unet, adapter, settings)
    assert len(summary["block_token_counts"]) == len(adapter.blocks)
    assert [r["tokens"] for r in summary["results"]] == [9, 3]
    for result in summary["results"]:
        assert result["b_flop_floor"] > 1
        assert result["b_flop_floor_recomputing_kv"] > result["b_flop_floor"]
        assert result["naive_flop_floor"] > result["b_flop_floor"]
        assert result["max_abs_diff_vs_naive"] < 1e-5
        assert result["kv_cache_bytes"] > 0
        assert {result["goal_a"], result["goal_c"], result["goal_memory"]} <= {"PASS", "MISS"}
    bench.print_table(summary)
    assert "goal (c)" in capsys.readouterr().out
