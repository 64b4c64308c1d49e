"""Stages broken in the ways a user's own stage can be, for the config tests: each must give one line
naming the stage, never a traceback. (The submodules fail on import; this one imports fine.)"""

from rtpipe.stages.base import Role, Stage


class FailsToBuild(Stage):
    role = Role.PROCESSOR

    def __init__(self, params=None):
        raise ValueError("no")


class FailsToSayItsOutput(Stage):
    role = Role.PROCESSOR

    def output_spec(self, input_spec):
        return {}["no such key"]
