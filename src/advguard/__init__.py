"""advguard: red-team, harden, gate and guard machine-learning models."""

from advguard.errors import AdvguardError, InputError, UnsafeFileError

__version__ = "0.1.0"

__all__ = ["AdvguardError", "InputError", "UnsafeFileError", "__version__"]
