#!/usr/bin/env bash
# Sets rtpipe up on a fresh Debian/Ubuntu machine: system audio packages, a virtual environment in .venv
# with the CPU build of torch first (so nothing pulls a CUDA build), then the project itself.
#   bash deploy/setup.sh          # to run it
#   bash deploy/setup.sh --test   # also the test and lint tools and Kyutai's reference `moshi` (tests only)
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

# PortAudio for sounddevice; PulseAudio gives a virtual speaker/microphone where there is no sound card;
# espeak-ng and sox make test speech; a C compiler and Python's headers build the rings' futex calls
# (shm/_futex.c; without them the rings make the same calls through ctypes, slower).
if command -v apt-get >/dev/null 2>&1; then
  packages="libportaudio2 pulseaudio pulseaudio-utils espeak-ng sox gcc"
  # the web page's tests drive Debian's Chromium headless
  [ "$with_tests" = 1 ] && packages="$packages chromium chromium-driver"
  python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || packages="$packages python3-dev"
  missing=""
  for pkg in $packages; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q $missing
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# TORCH_INDEX_URL picks a torch build elsewhere (e.g. PyTorch's cpu or cu128 index on a real host,
# where PyPI's Linux torch is the CUDA build); unset, pip's own index is used.
.venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
if [ "$with_tests" = 1 ]; then
  .venv/bin/pip install -q -e ".[test,lint]"
  # The reference implementation, for comparison tests only: it pins an older torch, so no deps.
  .venv/bin/pip install -q --no-deps moshi==0.2.13 einops sentencepiece "huggingface_hub<1.0" tqdm \
    requests urllib3 charset-normalizer idna certifi pyyaml
else
  .venv/bin/pip install -q -e .
fi
echo "rtpipe: set up in .venv ($(.venv/bin/python -c 'import torch; from rtpipe.shm import wakeup
print("torch", torch.__version__ + ", futex calls through the", wakeup.IMPLEMENTATION)'))"
