#!/usr/bin/env bash
# Runs the pack's host tests (the ones that need ComfyUI: tests/test_comfy_*.py, tests/test_face_nodes.py) against
# each ComfyUI checkout given, one after the other, and prints one line per checkout: its version, commit and the
# test summary. A checkout passes when nothing fails, errors or is skipped. It never fetches or builds ComfyUI: pass
# checkouts you made (e.g. of the oldest release pyproject.toml declares and of the newest), and run it from a
# Python environment holding ComfyUI's requirements and the pack's test requirements.
#
#   PYTHON=/path/to/venv/bin/python scripts/host_versions.sh ~/ComfyUI-0.10.0 ~/ComfyUI [-- extra pytest args]
set -u
python="${PYTHON:-python}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
checkouts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do checkouts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
if [ ${#checkouts[@]} -eq 0 ]; then
  echo "usage: scripts/host_versions.sh CHECKOUT... [-- pytest args]" >&2
  exit 2
fi
cd "$repo" || exit 2
summary=()
failed=0
for checkout in "${checkouts[@]}"; do
  checkout="$(cd "$checkout" 2>/dev/null && pwd)" || { summary+=("$checkout: not a folder"); failed=1; continue; }
  if [ ! -f "$checkout/comfyui_version.py" ] || [ ! -d "$checkout/comfy" ]; then
    summary+=("$checkout: not a ComfyUI checkout (no comfy/ or comfyui_version.py)"); failed=1; continue
  fi
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$checkout/comfyui_version.py")"
  commit="$(git -C "$checkout" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  log="$(mktemp -t "host-tests-$version-XXXX.log")"
  echo "== ComfyUI $version ($commit) at $checkout: log in $log"
  COMFYUI_PATH="$checkout" "$python" -m pytest -q -rfEs -p no:cacheprovider \
    tests/test_comfy_*.py tests/test_face_nodes.py "$@" >"$log" 2>&1
  code=$?
  result="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')"
  if [ $code -ne 0 ] || grep -qE '[0-9]+ (skipped|failed|error)' <<<"$result"; then
    failed=1
    grep -E '^(FAILED|ERROR|SKIPPED)' "$log" | head -20
    result="FAIL: ${result:-pytest exited with $code}"
  else
    result="ok: $result"
  fi
  summary+=("ComfyUI $version ($commit): $result")
done
echo "== $(date -u +%Y-%m-%d) pack $(git rev-parse --short HEAD 2>/dev/null), $("$python" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")')"
printf '%s\n' "${summary[@]}"
exit $failed
