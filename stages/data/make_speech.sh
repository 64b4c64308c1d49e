#!/usr/bin/env bash
# Rebuilds speech.wav, the built-in speech sample (`capture.file` with no path, `rtpipe run` without
# audio devices): espeak-ng speech, converted by sox to 24 kHz mono 16-bit PCM (small enough to ship).
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp --suffix=.wav)
trap 'rm -f "$tmp"' EXIT
espeak-ng -v en-us -s 160 -w "$tmp" "The quick brown fox jumps over the lazy dog. \
A real time pipeline hears every word you say, and answers before you finish your thought. \
Each frame is eighty milliseconds of audio, and every millisecond counts. \
Latency is measured from the microphone to the speaker."
sox "$tmp" -r 24000 -c 1 -b 16 -e signed-integer speech.wav
