"""cdc-serve: calibrated deep clustering you can export, serve and trust.

The package ``cdc_serve`` never imports torch at module level: scoring runs on
onnxruntime (or a Triton server) alone. Training lives in ``cdc_serve_training``
(the repository's ``training/`` folder), installed with the ``train`` extra.
"""

import os

__version__ = "0.1.0"


class CDCError(Exception):
    """An error with a message meant for the user (the CLI prints it, without a traceback)."""


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
