"""uvclab's version: a base module, so that lower layers (export cards, reports) read it without the package top."""
__version__ = "0.2.0"
