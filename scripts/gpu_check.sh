#!/usr/bin/env bash
# The checks to run the first time a CUDA machine is at hand, in under 10 minutes, printing one report:
#   1. the trainer rehearsed at real size in bf16 (python -m bench.real_scale): SD1.5 + ViT-H/14 + IResNet-100 with random
#      weights, prepare -> fit a few dozen steps (batch 4, N = 4, λ = 0.1, gradient checkpointing) -> the same run
#      killed halfway and resumed (exact?) -> export -> eval, IDAdapter and Inv-Adapter; step time, peak GPU memory,
#      finite losses; then each part's CUDA memory at batch 1 and 2 and the projected table;
#   2. the ComfyUI step overhead of Apply IDAdapter, Apply Inv-Adapter (first and later generation) and ComfyUI's GLIGEN
#      at 512² with PyTorch's attention kernel (python -m bench.step_overhead_host; needs COMFYUI_PATH);
#   3. the identity miniature's smoke run (python -m bench.identity_generation --quick): it runs on the CPU only.
# Usage: scripts/gpu_check.sh [--dry-run] [OUT_DIR]    (PYTHON=... to pick the interpreter; COMFYUI_PATH=... for 2)
# --dry-run prints the commands and runs the CPU-sized rehearsal (--quick) instead: what CI can check.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
out="${1:-$root/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
assets="${ASSETS:-$root/../shared/assets}"
cd "$root"

if [[ $dry_run == 0 ]] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device; run it on a GPU machine, or pass --dry-run" >&2
    exit 2
fi

step() {  # name, time limit in seconds, command...
    local name="$1" limit="$2"
    shift 2
    echo "== $name: $*" | tee -a "$out/commands.txt"
    if timeout "$limit" "$@" >"$out/$name.txt" 2>"$out/$name.log"; then
        echo "   done" | tee -a "$out/commands.txt"
    else
        echo "   FAILED or timed out (exit $?); see $out/$name.log" | tee -a "$out/commands.txt"
    fi
}

if [[ $dry_run == 1 ]]; then
    step rehearsal 900 "$python" -m bench.real_scale --quick --cpu --assets "$assets" --workdir "$out/work" \
        --json "$out/real_scale.json"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
    step rehearsal 330 "$python" -m bench.real_scale --assets "$assets" --workdir "$out/work" --steps 24 \
        --batch-size 4 --mixed-precision bf16 --threads 8 --memory-cap-gib 100 --parts-resolution 512 \
        --json "$out/real_scale.json"
    if [[ -n "${COMFYUI_PATH:-}" ]]; then
        step step_overhead 120 "$python" -m bench.step_overhead_host --attention pytorch \
            --variants base,fp16,inv-cold,inv-cached,gligen --latent 64 --rounds 3 --json "$out/step_overhead.json"
    else
        echo "== step_overhead: skipped (set COMFYUI_PATH to a ComfyUI checkout)" | tee -a "$out/commands.txt"
    fi
    # The identity miniature runs on the CPU only (a full seed takes ~35 min on 2 cores), so here only its smoke run.
    step identity_generation 120 "$python" -m bench.identity_generation --quick --seeds 1 \
        --workdir "$out/identity-work" --json "$out/identity_generation.json"
fi

echo
echo "==================== gpu_check report ($(date -u +%FT%TZ)) ===================="
[[ -f "$out/gpu.txt" ]] && cat "$out/gpu.txt"
for name in rehearsal step_overhead identity_generation; do
    if [[ -f "$out/$name.txt" ]]; then
        echo "---- $name"
        cat "$out/$name.txt"
    fi
done
echo "---- commands"
cat "$out/commands.txt"
echo "Everything is in $out"
