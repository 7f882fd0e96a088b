#!/usr/bin/env bash
# Side environment with another Triton (default 3.6.0, the GPU machines' version) for the compile check.
#
#   scripts/triton_side_env.sh DIR [VERSION]
#   PYTHONPATH=DIR python -m medmamba check --compile sm_80,sm_90
#
# Triton's wheel is self-contained (pure Python + its bundled LLVM/ptxas), so `pip install --no-deps
# --target DIR` is enough: with DIR first on PYTHONPATH, `import triton` finds that copy instead of the
# installed one, and torch, medmamba and everything else stay the installed ones. Nothing outside DIR is
# touched. The wheel must match this Python (cp311 here); pip takes it from the configured index.
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
dir=$1
version=${2:-3.6.0}
py=${PYTHON:-python3}
if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ] && [ ! -d "$dir/triton" ]; then
  echo "triton_side_env: $dir exists and does not look like a Triton side environment; choose another DIR" >&2
  exit 2
fi
# Install into a fresh folder next to DIR and swap it in, so an interrupted run never leaves DIR half written.
tmp=$(mktemp -d "${dir%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip install -q --no-deps --no-compile --only-binary=:all: --target "$tmp" "triton==$version"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
got=$(PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "import triton; print(triton.__version__)")
if [ "$got" != "$version" ]; then
  echo "triton_side_env: PYTHONPATH=$dir imports triton $got, expected $version" >&2
  exit 1
fi
echo "triton $version in $dir ($(du -sh "$dir" | cut -f1)); use: PYTHONPATH=$dir python -m medmamba check --compile sm_80,sm_90"
