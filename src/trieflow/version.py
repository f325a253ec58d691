"""The installed trieflow version, read from package metadata so it is defined once."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trieflow")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
