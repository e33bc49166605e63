"""Errors of the compression package: who is at fault, and whether trying again can help.

```
CompressionError                 base of everything raised here
├── InvalidInputError            the user's model or data is unusable (fatal: fix the input)
├── ConverterUnavailableError    the `convert` extra is not installed (fatal: install it)
└── ConversionError              a converter or quantizer failed on a valid input (fatal for this variant)
```

None of these is transient: running the same command again gives the same result.
"""

from __future__ import annotations

__all__ = ["CompressionError", "ConversionError", "ConverterUnavailableError", "InvalidInputError"]


class CompressionError(Exception):
    """Base of all compression errors."""


class InvalidInputError(CompressionError):
    """The model or data given by the user cannot be used (missing file, wrong shape, unknown name)."""


class ConverterUnavailableError(CompressionError):
    """A converter library is missing: install `edgefleet[convert]`."""


class ConversionError(CompressionError):
    """A converter or quantizer failed on an input that looked valid."""
