"""Stages: the interface every stage implements (base.py), the registry that finds them by name
(registry.py), and the stages themselves with their model code beside them.

What a stage author needs is importable from here:

    from rtpipe.stages import AUDIO_FRAME, PayloadSpec, Role, Stage
"""

from rtpipe.shm.frame import MAX_SESSIONS
from rtpipe.stages.base import (
    AUDIO_FRAME,
    FRAME_MS,
    FRAME_NS,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    EndOfStream,
    NoParams,
    NoState,
    PayloadSpec,
    Role,
    SessionSettings,
    SourceFrame,
    Stage,
)
from rtpipe.stages.errors import AudioError, CheckpointError, ConfigError, RtpipeError

__all__ = [
    "AUDIO_FRAME",
    "FRAME_MS",
    "FRAME_NS",
    "FRAME_SAMPLES",
    "MAX_SESSIONS",
    "SAMPLE_RATE",
    "AudioError",
    "CheckpointError",
    "ConfigError",
    "EndOfStream",
    "NoParams",
    "NoState",
    "PayloadSpec",
    "Role",
    "RtpipeError",
    "SessionSettings",
    "SourceFrame",
    "Stage",
]
