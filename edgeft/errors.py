"""The one base class for mistakes a user can fix.

The CLI prints `error: <message>` and exits 2 for these, without a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class EdgeftError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(EdgeftError):
    """One or more invalid fields, collected and reported at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")
