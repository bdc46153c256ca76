"""shadow-distill: the CLI, the demo and the local stack that tie the parts together.

`shadow_distill.errors` is the one exception hierarchy every part raises from.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shadow-distill")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
