#!/usr/bin/env bash
# One GPU run that says everything, for a fresh H100/H200 with torch and triton but no package index.
#
#   scripts/gpu_validate.sh OUT [--carry DIR] [--dry-run] [other scripts/gpu_validate.py options]
#
# Prepare first, on a machine with a package index: scripts/gpu_prepare.sh .gpu_carry (wheels + a preprocessed
# nnU-Net dataset); carry that folder along. Here the wheels are installed with pip --no-index --target into a
# temporary folder (only when monai/nnunetv2 are missing), an empty SimpleITK module stands in when SimpleITK is
# missing (its wheel is too big to carry), and the working tree's medmamba comes first on PYTHONPATH.
# Then scripts/gpu_validate.py runs the steps (within 8 minutes on an H200) and writes OUT/gpu_validate.{json,md},
# OUT/plan.{json,md} and OUT/gpu_validate_logs.tar.gz. --dry-run: no GPU needed (CPU rehearsal). See
# docs/gpu_validation.md.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
out=$1; shift
carry=${MEDMAMBA_GPU_CARRY:-.gpu_carry}
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --carry) carry=$2; shift 2 ;;
    --carry=*) carry=${1#--carry=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
case $carry in /*) ;; *) [ -d "$carry" ] || carry=$repo/$carry ;; esac
py=${PYTHON:-python3}
mkdir -p "$out"
t0=$(date +%s)
setup="carry $carry"
if ! "$py" -c "import monai, nnunetv2, nibabel, blosc2" >/dev/null 2>&1; then
  if ls "$carry"/wheels/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/gpu_validate_site.XXXXXX)
    # medmamba's own wheel only when the working tree has no medmamba/ (the tree is newer)
    whls=$(ls "$carry"/wheels/*.whl | { if [ -d "$repo/medmamba" ]; then grep -v '/medmamba-'; else cat; fi; })
    # shellcheck disable=SC2086
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $whls; then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
      export PATH="$site/bin:$PATH"
      setup="$setup; installed $(echo "$whls" | wc -l) wheels into $site"
    else
      setup="$setup; WHEEL INSTALL FAILED"
    fi
  else
    setup="$setup; monai/nnunetv2 missing and no wheels in $carry/wheels (run scripts/gpu_prepare.sh)"
  fi
fi
if ! "$py" -c "import SimpleITK" >/dev/null 2>&1; then
  stub=$(mktemp -d /tmp/gpu_validate_stub.XXXXXX)
  mkdir -p "$stub/SimpleITK" && : > "$stub/SimpleITK/__init__.py"
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$stub"   # last: a real SimpleITK, if any, still wins
  setup="$setup; SimpleITK stub"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export GPU_VALIDATE_SETUP_S=$(( $(date +%s) - t0 ))
export GPU_VALIDATE_SETUP="$setup ($GPU_VALIDATE_SETUP_S s)"
echo "gpu_validate.sh: $GPU_VALIDATE_SETUP"
cd "$repo" && exec "$py" scripts/gpu_validate.py "$out" --nnunet-data "$carry/nnunet" "${args[@]}"
