"""Errors that are the user's to fix: the CLI prints them as one line each and exits with status 2."""

from __future__ import annotations


class QloraError(Exception):
    """A problem with the user's config, data, paths or resources, phrased as cause and fix."""

    exit_code = 2


class ConfigError(QloraError):
    """One or more invalid config values, all reported together."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(f"config error: {p}" for p in self.problems))


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's message (or of a text), or the exception type's name when the message is
    empty: for one-line reports of errors raised by libraries. Never raises."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else (type(e).__name__ if isinstance(e, BaseException) else "")
