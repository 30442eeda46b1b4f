"""InvalidInput, in a module of its own: the request ids, the HTTP validation and the CLI all raise it, and none of them
should import the others (nor driftloop.errors, which imports every layer)."""


class InvalidInput(ValueError):
    """Input that is refused: HTTP 4xx in the app (`status` is the code), a one-line exit in the CLI; str() is the message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status
