"""`rtpipe devices`: lists what PortAudio sees, and says clearly when there is nothing or no PortAudio."""

from __future__ import annotations

import json

import rtpipe.pipeline.cli.devices as cmd_devices
from rtpipe.stages.errors import AudioError

ROWS = [
    {
        "index": 0,
        "name": "pulse",
        "hostapi": "ALSA",
        "inputs": 32,
        "outputs": 32,
        "default_samplerate": 44100.0,
        "default_input": False,
        "default_output": False,
    },
    {
        "index": 1,
        "name": "default",
        "hostapi": "ALSA",
        "inputs": 32,
        "outputs": 32,
        "default_samplerate": 44100.0,
        "default_input": True,
        "default_output": True,
    },
]


def test_devices_are_listed_with_the_defaults_marked(monkeypatch, capsys):
    monkeypatch.setattr(cmd_devices, "list_audio_devices", lambda: ROWS)
    assert cmd_devices.main([]) == 0
    out = capsys.readouterr().out
    assert "pulse" in out and "<>  1 default" in out


def test_no_devices_is_said_in_a_sentence_with_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(cmd_devices, "list_audio_devices", lambda: [])
    assert cmd_devices.main([]) == 1
    out = capsys.readouterr().out
    assert out.startswith("rtpipe: no audio devices") and "PulseAudio" in out and "rtpipe-out.wav" in out


def test_missing_portaudio_is_said_in_one_line(monkeypatch, capsys):
    def missing():
        raise AudioError("PortAudio library not found (install libportaudio2): no library")

    monkeypatch.setattr(cmd_devices, "list_audio_devices", missing)
    assert cmd_devices.main([]) == 1
    out = capsys.readouterr().out
    assert out.strip() == "rtpipe: audio error: PortAudio library not found (install libportaudio2): no library"
    assert cmd_devices.main(["--json"]) == 1
    assert "PortAudio" in json.loads(capsys.readouterr().out)["error"]


def test_the_null_sink_shows_up_as_real_devices(pulse_null_sink, capsys):
    assert cmd_devices.main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["devices"]
    assert any(r["inputs"] > 0 for r in rows) and any(r["outputs"] > 0 for r in rows)
