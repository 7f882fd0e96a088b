#!/usr/bin/env bash
# Prepare, on a machine WITH a package index, what scripts/gpu_validate.sh needs on a fresh GPU machine
# without one, into CARRY_DIR (default .gpu_carry; git-ignored):
#
#   CARRY_DIR/wheels/   the wheels the GPU machine lacks (../shared/tools/device-wheels.sh: monai, nnunetv2,
#                       nibabel, blosc2, ...; no SimpleITK, a stub stands in) + a wheel of medmamba itself
#   CARRY_DIR/nnunet/   a real dataset (IBSI soft-tissue sarcoma CT, ../shared/data/ibsi_sts) planned and
#                       preprocessed for nnU-Net 3d_fullres here, so the GPU run only trains from it
#
# Usage (repo root):  scripts/gpu_prepare.sh .gpu_carry
# Environment: MEDMAMBA_DATA (default ../shared/data), DEVICE_WHEELS (default ../shared/tools/device-wheels.sh),
#              GPU_PREPARE_CASES (default 10: every ibsi_sts case), PYTHON (default python3).
# It ends by printing the size of what travels (working tree + CARRY_DIR) against the device's 64 MiB limit
# and exits 1 when it does not fit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
carry=${1:-.gpu_carry}
py=${PYTHON:-python3}
data=${MEDMAMBA_DATA:-$repo/../shared/data}
wheels_tool=${DEVICE_WHEELS:-$repo/../shared/tools/device-wheels.sh}
mkdir -p "$carry"
carry=$(cd "$carry" && pwd)
t0=$(date +%s)

echo "[1/3] wheels -> $carry/wheels"
rm -rf "$carry/wheels.tmp"
bash "$wheels_tool" "$carry/wheels.tmp" >/dev/null
# medmamba itself (pure Python; the device run imports the working tree first, the wheel is the fallback)
build=$(mktemp -d)
cp -r "$repo/medmamba" "$repo/plans" "$repo/pyproject.toml" "$repo/setup.py" "$repo/README.md" \
      "$repo/medmamba_nnunet.pth" "$repo/medmamba_nnunet_hook.py" "$build/"
(cd "$build" && "$py" -m pip wheel -q --no-deps --no-build-isolation . -w "$carry/wheels.tmp" 2>&1 | grep -v '^WARNING' || true)
rm -rf "$build"
ls "$carry/wheels.tmp"/medmamba-*.whl >/dev/null
rm -rf "$carry/wheels" && mv "$carry/wheels.tmp" "$carry/wheels"

echo "[2/3] nnU-Net dataset: plan + preprocess $data/ibsi_sts -> $carry/nnunet (a minute or two)"
"$py" "$repo/scripts/gpu_validate.py" --prepare-nnunet "$carry/nnunet" --data "$data/ibsi_sts" \
      --cases "${GPU_PREPARE_CASES:-10}"

echo "[3/3] size"
carry_b=$(du -sb "$carry" | cut -f1)
# what else travels: the working tree's tracked and untracked-but-not-ignored files
tree_b=$(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((carry_b + tree_b))
limit=$((64 * 1024 * 1024))
printf '  wheels %s, nnunet %s, working tree %s MiB; total %s MiB of 64 MiB (%ss)\n' \
  "$(du -sh "$carry/wheels" | cut -f1)" "$(du -sh "$carry/nnunet" | cut -f1)" \
  "$(awk "BEGIN{printf \"%.1f\", $tree_b/1048576}")" "$(awk "BEGIN{printf \"%.1f\", $total/1048576}")" \
  "$(( $(date +%s) - t0 ))"
if [ "$total" -gt "$limit" ]; then
  echo "gpu_prepare: $carry plus the working tree exceed 64 MiB; use fewer cases (GPU_PREPARE_CASES)" >&2
  exit 1
fi
echo "ready: carry [\"$(basename "$carry")\"] with: scripts/gpu_validate.sh \$OUT --carry $(basename "$carry")"
