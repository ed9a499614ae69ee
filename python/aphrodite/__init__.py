"""Aphrodite: an inference engine for vision-language models.

The C++ core is exposed as :mod:`aphrodite._C`; this package holds the Python API around it.
"""

from aphrodite._C import __version__
from aphrodite._envinfo import env_info

__all__ = ["__version__", "env_info"]
