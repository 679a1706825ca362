"""The one exception type that reaches the user as a one-line message (CLI exit status 2)."""


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do.

    The CLI prints ``depthvid: error: <message>`` on one line and exits with status 2;
    library callers get an ordinary ``ValueError`` subclass.
    """
