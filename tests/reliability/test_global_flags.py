"""The engine must leave torch's global precision flags usable, whichever API the user sets them with.

Found while writing the CUDA tests: ``side_effect_guard`` saves and restores the float32 matmul
precision with ``torch.set_float32_matmul_precision``. A user who sets TF32 with the legacy flag
(``torch.backends.cuda.matmul.allow_tf32``, the spelling most training scripts use) and changes it
after a measurement leaves torch (2.13) in a "mix of the legacy and new APIs" state, in which
``torch.get_float32_matmul_precision()`` raises -- so the *next* measurement raises out of the
training hook. The same toggling without the engine in between is fine (checked below), so the
engine is the cause. Runs in a subprocess: the broken state is process-wide.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

_PRELUDE = """
import torch
from torch import nn
model, x = nn.Linear(3, 2), torch.randn(4, 3)
"""


def _run(body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_toggling_the_legacy_tf32_flag_alone_is_fine():
    # Control: without the engine in between, torch accepts this sequence.
    proc = _run(
        """
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
        print(torch.get_float32_matmul_precision())
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_measurement_after_the_user_toggles_the_legacy_tf32_flag():
    proc = _run(
        """
        from lazy_monitor import empirical_ntk
        torch.backends.cuda.matmul.allow_tf32 = True
        empirical_ntk(model, x)
        torch.backends.cuda.matmul.allow_tf32 = False   # e.g. switched off for evaluation
        empirical_ntk(model, x)
        print(torch.get_float32_matmul_precision())
        """
    )
    assert proc.returncode == 0, proc.stderr
