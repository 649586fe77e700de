"""The errors of reading adapters: at the bottom of the package, so every module can raise them."""
from __future__ import annotations

__all__ = ["AdapterFileError", "PeftFormatError"]


class AdapterFileError(ValueError):
    """An adapter file that is damaged, malformed, or that does not belong to the model it is loaded into.
    The message names the file, and the module and key where one is at fault."""


class PeftFormatError(AdapterFileError):
    """A PEFT-format adapter (or an authors' checkpoint) that peft-ops cannot represent or that does not
    fit the model."""
