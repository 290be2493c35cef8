"""The one exception type shareport raises for bad input.

Every message names the file (or option) and the problem in one line, so the CLI can print it
as is and exit non-zero. Anything else escaping to the CLI is a bug in shareport.
"""


class ShareportError(Exception):
    """Bad input or an unsupported feature; the message is one line for the user."""


_SAID: set[str] = set()


def note(message: str) -> None:
    """One line on stderr about something shareport decided for the user (not an error);
    each message once per process (a command may load the same base twice)."""
    import sys

    if message not in _SAID:
        _SAID.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)
