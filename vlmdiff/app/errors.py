"""The app's one error type for requests it cannot do, and how user text is quoted in messages."""

MAX_ECHO = 60  # characters of a user-given name (file, class, folder) repeated in a message


class ServiceError(ValueError):
    """A request the app cannot do; the message is meant for the user."""


def shorten(text: object, limit: int = MAX_ECHO) -> str:
    """`text` as a string cut to `limit` characters (an ellipsis marks the cut), for quoting user input."""
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
