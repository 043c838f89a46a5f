"""Adapters for training frameworks other than Lightning.

* :mod:`lazy_monitor.integrations.transformers` -- Hugging Face ``transformers.Trainer``
  callbacks (``transformers`` and ``accelerate``: the ``hf`` extra, ``pip install "lazy-monitor[hf]"``).

Imports are lazy: importing this package imports no framework.
"""

__all__ = ["transformers"]
