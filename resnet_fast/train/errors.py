"""Failures the user can fix. `run` prints their message as one line and
returns their exit code; anything else is a bug and keeps its traceback."""


class TrainError(Exception):
    exit_code = 2


class ConfigError(TrainError):
    """Flags that contradict each other, the machine, or the resumed run."""


class DataError(TrainError):
    """The data set is missing or not in the expected on-disk layout."""


class CheckpointError(TrainError):
    """A --resume file that is unreadable, foreign or does not fit the run."""


class DivergedError(TrainError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3
