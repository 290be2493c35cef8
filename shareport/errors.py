"""The one exception type shareport raises for bad input.

Every message names the file (or option) and the problem in one line, so the CLI can print it
as is and exit non-zero. Anything else escaping to the CLI is a bug in shareport.
"""


class ShareportError(Exception):
    """Bad input or an unsupported feature; the message is one line for the user."""
