"""The one exception type the bundle raises for problems a user can fix, and how it is shown."""

from __future__ import annotations

import os
import sys


class BundleInputError(ValueError):
    """A user-fixable problem with an input (file, folder, checkpoint, setting).

    The message is one sentence naming the input, what is wrong and what to do.
    """


def _find_input_error(exc: BaseException | None) -> BundleInputError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BundleInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook() -> None:
    """Show an uncaught BundleInputError as its one sentence, not as MONAI's nested config traceback.

    ``python -m monai.bundle run`` wraps every failure in "Failed to evaluate ConfigExpression"; the
    user's mistake is the sentence at the bottom of that chain. Set ``BUNDLE_TRACEBACK=1`` for the full
    traceback. Other exceptions are shown as usual.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        error = _find_input_error(exc)
        if error is None or os.environ.get("BUNDLE_TRACEBACK"):
            return previous(exc_type, exc, tb)
        print(f"error: {error}", file=sys.stderr)

    if getattr(sys.excepthook, "__name__", "") != "hook":
        sys.excepthook = hook
