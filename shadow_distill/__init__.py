"""shadow-distill's application shell: the CLI, the demo and the local stack that tie the parts together.

Nothing below this package imports it (see `tests/unit/test_layers.py`); the exception hierarchy every part
raises from lives in `foundation.errors`.
"""

from foundation.version import __version__

__all__ = ["__version__"]
