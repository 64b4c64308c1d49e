"""`rtpipe devices`: the audio devices PortAudio sees, marked with the defaults the pipeline opens, or a
plain sentence saying why there are none (no PortAudio library, no sound server or card).
"""

from __future__ import annotations

import argparse
import json

from rtpipe.stages.audio_io import list_audio_devices
from rtpipe.stages.errors import AudioError

NO_DEVICES_HINT = (
    "no audio devices: PortAudio found no sound card or sound server. On a machine without "
    "one, start PulseAudio with a 24 kHz float32 mono null sink (see README) to get a "
    "virtual speaker and microphone; `rtpipe run` meanwhile runs the built-in speech "
    "sample into rtpipe-out.wav."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpipe devices", description="list audio devices")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    return parser


def format_devices(rows: list[dict]) -> str:
    lines = [f"  {'#':>3} {'name':<32} {'host API':<10} {'in':>3} {'out':>3} {'rate Hz':>8}"]
    for r in rows:
        mark = ("<" if r["default_input"] else " ") + (">" if r["default_output"] else " ")
        lines.append(
            f"{mark}{r['index']:>3} {r['name'][:32]:<32} {r['hostapi'][:10]:<10} {r['inputs']:>3} "
            f"{r['outputs']:>3} {r['default_samplerate']:>8.0f}"
        )
    lines.append(
        "< default input (capture.microphone), > default output (playback.speaker); choose "
        "another with params.device = NAME or index"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = list_audio_devices()
    except AudioError as e:
        if args.json:
            print(json.dumps({"devices": [], "error": str(e)}))
        else:
            print(f"rtpipe: {e}")
        return 1
    if args.json:
        print(json.dumps({"devices": rows}, indent=1))
        return 0 if rows else 1
    if not rows:
        print(f"rtpipe: {NO_DEVICES_HINT}")
        return 1
    print(format_devices(rows))
    return 0
