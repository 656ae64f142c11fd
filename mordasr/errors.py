"""Errors shared by every command. Each carries a one-line message meant for the user."""


class MordasrError(Exception):
    """Base class: ``str(err)`` is a one-line reason that a CLI prints as is, exiting with
    ``exit_code`` (2: the input or the environment is wrong)."""

    exit_code = 2


class BundleError(MordasrError):
    """A bundle is missing, incomplete, corrupted or from an incompatible exporter."""


class ImageError(MordasrError):
    """An input image cannot be decoded or is not usable."""


class CheckpointError(MordasrError):
    """A model checkpoint is missing, corrupted or does not match the requested preset."""


class AccuracyGateFailed(MordasrError):
    """A reduced-precision bundle ran, but a bucket missed the accuracy gate; it was kept aside."""

    exit_code = 1


class ImageTooLarge(ImageError):
    """An input image has more pixels than allowed (or declares a decompression-bomb size)."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
