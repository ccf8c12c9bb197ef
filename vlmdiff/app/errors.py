"""The app's one error type for requests it cannot do."""


class ServiceError(ValueError):
    """A request the app cannot do; the message is meant for the user."""
