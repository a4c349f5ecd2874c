"""Wyoming-protocol streaming speech-to-text server powered by Kyutai STT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wyoming_kyutai")  # pyproject.toml holds it; nothing else does
except PackageNotFoundError:  # a source tree that was never installed (pip install -e .)
    __version__ = "0+unknown"
