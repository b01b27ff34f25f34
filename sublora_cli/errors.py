"""Errors the CLI turns into exit codes (DESIGN §2): one class per code, so no stage prints or exits."""


class SubloraError(Exception):
    """Bad input or a failure the user can act on: exit code 1, message shown without a traceback."""

    exit_code = 1


class QualityGateFailed(SubloraError):
    """A quality guard such as --max-loss-increase failed after the output was written: exit code 3."""

    exit_code = 3
