"""The one exception type the bundle raises for problems a user can fix, and how it is shown."""

from __future__ import annotations

import errno
import os
import sys


class BundleInputError(ValueError):
    """A user-fixable problem with an input (file, folder, checkpoint, setting).

    The message is one sentence naming the input, what is wrong and what to do.
    """


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


# what torch says when a GPU is asked for on a machine without a usable one
_NO_CUDA = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "No CUDA GPUs are available")


def user_message(exc: BaseException | None) -> str | None:
    """The one sentence for a failure the user can fix, found anywhere in the exception chain: a
    BundleInputError's own message, a GPU asked for where there is none, or a file or folder that cannot be
    written or read for lack of permission; ``None`` for anything else (a bug, shown with its traceback)."""
    chain = list(_chain(exc))
    for error in chain:
        if isinstance(error, BundleInputError):
            return str(error)
    for error in chain:
        if any(text in str(error) for text in _NO_CUDA):
            return ("--device asks for a GPU (CUDA) and torch finds none on this machine: leave --device out (the "
                    "bundle uses a GPU when there is one) or pass --device cpu.")
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and error.filename:
            return (f"'{error.filename}' cannot be opened ({error.strerror}): choose a folder you can write to "
                    "(--work_dir, --output_dir) and files you can read.")
    return None


def install_excepthook() -> None:
    """Show an uncaught failure the user can fix (:func:`user_message`) as its one sentence, not as MONAI's nested
    config traceback.

    ``python -m monai.bundle run`` wraps every failure in "Failed to evaluate ConfigExpression"; the
    user's mistake is the sentence at the bottom of that chain. Set ``BUNDLE_TRACEBACK=1`` for the full
    traceback. Other exceptions are shown as usual.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        message = user_message(exc)
        if message is None or os.environ.get("BUNDLE_TRACEBACK"):
            return previous(exc_type, exc, tb)
        print(f"error: {message}", file=sys.stderr)

    if getattr(sys.excepthook, "__name__", "") != "hook":
        sys.excepthook = hook
