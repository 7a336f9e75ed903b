#!/usr/bin/env bash
# Make the wheel folder that run.sh's install step takes to a GPU machine (at most 64 MiB: the
# device tool's carry limit). Wheels are for CPython 3.12 on x86_64 Linux (the GPU machine seen
# so far: Python 3.12, torch 2.11+cu130, no pydantic), fetched with `pip download --no-deps`
# at the versions of requirements/constraints-cpu.txt, plus this package built with `pip wheel`.
#
#   bash benchmarks/gpu/pack_wheels.sh [DIR]      # default build/gpu-wheels (git-ignored)
#   PY_VERSION=3.11 bash benchmarks/gpu/pack_wheels.sh   # another interpreter
#
# Tiers, in order, while they fit: the package's training path (megatron-core, pydantic, ...),
# then megatron-energon and its small dependencies, then what a bare torch install may lack
# (numpy, pillow, safetensors, transformers ...). What is left out goes to DIR/not_carried.json
# with the reason: over the limit, no wheel for 3.12, or known too large (Transformer Engine
# for CUDA 13 ~264 MB, a CUDA vLLM ~321 MB that also pins another torch: earlier readings, not
# downloaded again here; MEASURE_UNCARRIED=1 downloads them into a temp dir to measure).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-build/gpu-wheels}
PY=${PYTHON:-python3}
PYV=${PY_VERSION:-3.12}
ABI="cp${PYV/./}"
LIMIT_MIB=${LIMIT_MIB:-64}
C=requirements/constraints-cpu.txt
rm -rf "$DIR" && mkdir -p "$DIR"
LEFT=$(mktemp)
trap 'rm -f "$LEFT"' EXIT

TIER1="megatron-core pydantic pydantic-core typing-inspection annotated-types typing-extensions pyyaml packaging psutil tqdm"
TIER2="megatron-energon braceexpand filetype webdataset click"
TIER3="numpy pillow safetensors einops transformers tokenizers huggingface-hub regex multi-storage-client"

pin() {  # "name==version" from the constraints file, else the bare name
  local v
  v=$(grep -i -E "^${1//-/[-_]}==" "$C" | head -1 || true)
  echo "${v:-$1}"
}
size_mib() { du -sm --apparent-size "$DIR" | cut -f1; }

# 1. this package (pure Python; its dependencies are not pulled: --no-deps)
EGG_BEFORE=0; [[ -d megatron_autothink.egg-info ]] && EGG_BEFORE=1
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" . >/dev/null
[[ $EGG_BEFORE == 0 ]] && rm -rf megatron_autothink.egg-info  # setuptools leaves it in the tree
for tier in "$TIER1" "$TIER2" "$TIER3"; do
  for name in $tier; do
    tmp=$(mktemp -d)
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
        --implementation cp --abi "$ABI" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$tmp" "$(pin "$name")" \
        >/dev/null 2>&1; then
      echo "$name|no wheel for CPython $PYV x86_64 at $(pin "$name")" >>"$LEFT"
      rm -rf "$tmp"; continue
    fi
    add=$(du -sm --apparent-size "$tmp" | cut -f1)
    if (( $(size_mib) + add > LIMIT_MIB )); then
      echo "$name|${add} MiB would pass the ${LIMIT_MIB} MiB limit" >>"$LEFT"
    else
      mv "$tmp"/*.whl "$DIR"/
    fi
    rm -rf "$tmp"
  done
done
echo "transformer-engine|~264 MB (CUDA 13 build; earlier reading): over the limit" >>"$LEFT"
echo "vllm|~321 MB (CUDA build; earlier reading) and pins another torch: over the limit" >>"$LEFT"
if [[ "${MEASURE_UNCARRIED:-0}" == "1" ]]; then
  for name in transformer-engine vllm; do
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp" "$name" \
      >/dev/null 2>&1 || true
    echo "$name|measured now: $(du -sm --apparent-size "$tmp" | cut -f1) MiB" >>"$LEFT"
    rm -rf "$tmp"
  done
fi
"$PY" - "$DIR" "$LEFT" <<'PYEOF'
import json, sys
from pathlib import Path
out, left = Path(sys.argv[1]), Path(sys.argv[2])
rows = [dict(zip(("name", "why"), line.split("|", 1))) for line in left.read_text().splitlines()]
(out / "not_carried.json").write_text(json.dumps(rows, indent=1) + "\n")
PYEOF
echo "$DIR: $(find "$DIR" -name "*.whl" | wc -l) wheels, $(size_mib) MiB (limit ${LIMIT_MIB} MiB)"
echo "not carried:"; sed 's/|/: /' "$LEFT" | sed 's/^/  /'
