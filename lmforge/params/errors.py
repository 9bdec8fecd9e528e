"""The project's error classes.

``LmforgeError`` is the base of every mistake a user can fix (bad config, missing input), raised
anywhere in the project; it sits with the params code, which every layer imports, so that raising it
costs no import of a stage's code.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """A user mistake (bad config, missing input): the CLI prints it as one line, without a traceback."""


class ParamsError(LmforgeError, ValueError):
    """A mistake in a params file."""
