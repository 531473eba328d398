"""The ground floor of errors (imports nothing of xlt)."""


class XltError(Exception):
    """A user-facing error: printed as one line (``xlt: error: ...``), exit status 2, raised before expensive work."""
