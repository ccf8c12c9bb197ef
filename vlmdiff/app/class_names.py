"""Class names as the app compares them: case and surrounding spaces do not make a new class,
and the names the pipeline gives a meaning to are reserved."""
from __future__ import annotations

from vlmdiff.app.errors import ServiceError, shorten
from vlmdiff.pipeline import AUTO_CLASS, UNKNOWN_CLASS
from vlmdiff.training.finetune import validate_class_name

RESERVED = {AUTO_CLASS: "lets the model guess the class", UNKNOWN_CLASS: "is what a model without a memory reports"}


def known_class(name: str | None, known: list[str]) -> str | None:
    """The known class `name` means, ignoring case and surrounding spaces; None if there is none."""
    key = (name or "").strip().casefold()
    return next((k for k in known if k.casefold() == key), None)


def require_known(name: str | None, known: list[str]) -> str:
    """The known class `name` means; ServiceError listing the classes otherwise."""
    match = known_class(name, known)
    if match is None:
        raise ServiceError(f"Unknown class {shorten(name)!r}; choose one of: {', '.join(known) or 'none yet'}.")
    return match


def new_class_name(name: str | None, known: list[str]) -> str:
    """The class a fine-tune should train: a known class it matches, or the valid new name."""
    stripped = (name or "").strip()
    if stripped.casefold() in RESERVED:
        raise ServiceError(f"{shorten(stripped)!r} is a reserved name ('{stripped.casefold()}' "
                           f"{RESERVED[stripped.casefold()]}); choose another name.")
    try:
        stripped = validate_class_name(stripped)
    except ValueError as error:
        reason = str(error).replace(repr(stripped), repr(shorten(stripped)))  # the library's rule, the name cut
        raise ServiceError(f"Invalid class name: {reason}.") from error
    return known_class(stripped, known) or stripped


def same_name_note(typed: str | None, class_name: str) -> str:
    """A sentence when what was typed names `class_name` only once case and spaces are ignored."""
    if typed is None or typed == class_name:
        return ""
    return f"{shorten(typed)!r} is the class {class_name!r}: class names ignore case and surrounding spaces."
