"""cdc-serve: calibrated deep clustering you can export, serve and trust.

The package ``cdc_serve`` never imports torch at module level: scoring runs on
onnxruntime (or a Triton server) alone. Training lives in ``cdc_serve_training``
(the repository's ``training/`` folder), installed with the ``train`` extra.
"""

__version__ = "0.1.0"


class CDCError(Exception):
    """An error with a message meant for the user (the CLI prints it, without a traceback)."""
