"""Wyoming-protocol streaming speech-to-text server powered by Kyutai STT."""

__version__ = "0.1.0"
