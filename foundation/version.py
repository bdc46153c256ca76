"""The installed version of shadow-distill (recorded on every registered model version)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shadow-distill")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
