"""Demo and example support (plain torch, no Lightning): an NTK-parameterised MLP
(:mod:`~lazy_monitor.demo.models`) and data generated in code (:mod:`~lazy_monitor.demo.datasets`).
Used by ``lazy-monitor demo``, ``examples/`` and ``benchmarks/``; not part of the monitoring API.
"""
