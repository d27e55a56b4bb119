"""Exit codes, in one place."""

from enum import IntEnum


class ExitCode(IntEnum):
    """What the process exit status means (128 + N: ended by signal N, as shells do)."""

    OK = 0  # every objective met
    OBJECTIVE_FAILED = 1
    BAD_SCENARIO = 2  # or bad usage
    UNREACHABLE = 3  # the target could not be reached
    INCONCLUSIVE = 4  # no objective failed, but the prober's own limits left one undecided
    REPORTS_NOT_WRITTEN = 5  # every objective met, but a report could not be written
    INTERRUPTED = 130  # SIGINT; SIGTERM gives 143, SIGHUP 129
