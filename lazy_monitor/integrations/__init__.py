"""Adapters for training frameworks other than Lightning.

* :mod:`lazy_monitor.integrations.transformers` -- Hugging Face ``transformers.Trainer``
  callbacks (``transformers`` and ``accelerate`` are dependencies of the package).

Imports are lazy: importing this package imports no framework.
"""

__all__ = ["transformers"]
