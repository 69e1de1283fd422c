"""User-facing errors.

An :class:`InputError` carries a one-line message that names the problem and the limit.
It is safe to show to an API user (no traceback, no internal paths beyond the input name).
"""


class InputError(ValueError):
    """A bad input: the message is shown to the user as-is."""


class GenerationCancelled(Exception):
    """Raised by a progress callback to stop generation between denoising steps."""
