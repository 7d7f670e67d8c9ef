"""The one error type the faces show to users as a message rather than a stack trace."""


class WorkbenchError(ValueError):
    """Bad user input or an unusable file/model; the message names what is wrong and where."""
