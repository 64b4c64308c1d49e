"""Finds a stage class from a config's `kind`: a built-in name, an entry point, or `package.module:Class`.

An experiment swaps a stage by naming another kind; the runtime never imports a stage directly.
Third-party packages register stages under the entry-point group `rtpipe.stages`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from rtpipe.stages.base import Stage
from rtpipe.stages.errors import ConfigError, raised_as

ENTRY_POINT_GROUP = "rtpipe.stages"

# Built-in names -> where the class lives. Imported only when named, so a config that uses no model
# never imports torch.
BUILTIN_STAGES: dict[str, str] = {
    "capture.microphone": "rtpipe.stages.audio_io:MicrophoneCapture",
    "capture.file": "rtpipe.stages.audio_io:FileCapture",
    "capture.tone": "rtpipe.stages.audio_io:ToneCapture",
    "playback.speaker": "rtpipe.stages.audio_io:SpeakerPlayback",
    "playback.file": "rtpipe.stages.audio_io:FilePlayback",
    "playback.null": "rtpipe.stages.audio_io:NullPlayback",
    "network.edge": "rtpipe.stages.network.edge:NetworkEdge",
    "echo": "rtpipe.stages.standins:Echo",
    "codec.pcm": "rtpipe.stages.standins:PcmCodec",
    "mimi.encode": "rtpipe.stages.mimi.stage:MimiEncode",
    "mimi.decode": "rtpipe.stages.mimi.stage:MimiDecode",
    "moshi.step": "rtpipe.stages.moshi.stage:MoshiStep",
}


def known_kinds() -> list[str]:
    """Every name a config can use: built-ins and installed entry points."""
    return sorted(set(BUILTIN_STAGES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def find_stage(kind: str, where: str = "kind") -> type[Stage]:
    """The Stage subclass for `kind`; raises ConfigError naming `where` when it cannot be found."""
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{where} = {kind!r}: expected a stage name or package.module:Class")
    if kind in BUILTIN_STAGES:
        return _load(BUILTIN_STAGES[kind], kind, where)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            return _load(ep.value, kind, where)
    if ":" in kind:
        return _load(kind, kind, where)
    raise ConfigError(
        f"{where} = {kind!r}: unknown stage (known: {', '.join(known_kinds())}; or give package.module:Class)"
    )


def _load(path: str, kind: str, where: str) -> type[Stage]:
    module_name, _, class_name = path.partition(":")
    if not module_name or module_name.startswith(".") or not class_name:
        raise ConfigError(f"{where} = {kind!r}: expected package.module:Class (an absolute module name)")
    # a module that is there but broken (a SyntaxError, an error raised on import) is one line too
    with raised_as(ConfigError, f"{where} = {kind!r}: importing {module_name} failed"):
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"{where} = {kind!r}: cannot import {module_name}: {e}") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"{where} = {kind!r}: {module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ConfigError(f"{where} = {kind!r}: {path} is not a stages.base.Stage subclass")
    return cls
