"""The project's error kinds, one per thing a person can get wrong.

Every error carries the path to what is wrong (a config field, a file, a key) in its message, so the
command line prints it in one line without a traceback. `pipeline/` re-exports these and adds its own.
"""

from contextlib import contextmanager


class RtpipeError(Exception):
    """Base of every error rtpipe reports to a person; `kind` prefixes the one-line message."""

    kind = "error"

    def __str__(self) -> str:
        return f"{self.kind}: {super().__str__()}"


class ConfigError(RtpipeError):
    """A pipeline config or stage parameter is wrong; the message starts with the field's path."""

    kind = "config error"


class CheckpointError(RtpipeError):
    """A weights file cannot be loaded: not safetensors, missing/unexpected keys, wrong shapes or dtype."""

    kind = "checkpoint error"


class AudioError(RtpipeError):
    """An audio file or device cannot be read, written or opened."""

    kind = "audio error"


@contextmanager
def raised_as(error_class: type[RtpipeError], prefix: str):
    """Runs code that is not ours (a user's stage): whatever it raises becomes one `error_class` line,
    `prefix: ExceptionType: message`. Our own errors pass as they are: they already say what is wrong."""
    try:
        yield
    except RtpipeError:
        raise
    except Exception as e:
        raise error_class(f"{prefix}: {type(e).__name__}: {' '.join(str(e).split()) or '(no message)'}") from e
