"""Every implementation x kind on the model zoo of tests/_zoo.py against the float64 brute force.

The zoo covers the models on which the engine used to crash or could silently mis-factorise:
inputs shared by the batch (GPT-2 ``wpe``, position embeddings), sequence-first layouts
(TransformerEncoder, MultiheadAttention), parameters used through ``expand`` + ``cat``, models
``vmap`` cannot run (LSTM/GRU, PReLU, a custom ``autograd.Function``), convolutions and every
norm layer. ``ntvp`` on a model with an op lacking forward-mode AD must raise the documented
error.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from lazy_monitor.core.kernels import ForwardADUnsupportedError, empirical_ntk
from tests._reference import reference_ntk
from tests._zoo import ZOO, ZOO_MULTI_INPUT, ZooCase
from tests._zoo import build as _build

IMPLEMENTATIONS = ("auto", "structured", "jacobian", "ntvp")
KINDS = ("full", "trace", "diagonal")


@functools.cache
def build(name: str) -> ZooCase:
    """One build per model for the module: the engine must leave it untouched anyway."""
    return _build(name)


_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


def _reference(name: str, kind: str) -> torch.Tensor:
    if name not in _REFERENCE:
        case = build(name)
        full, _ = reference_ntk(case.model, case.x, kind="full", output_fn=case.output_fn)
        diag = full.diagonal(dim1=2, dim2=3)
        _REFERENCE[name] = {"full": full, "diagonal": diag, "trace": diag.sum(-1)}
    return _REFERENCE[name][kind]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted({**ZOO, **ZOO_MULTI_INPUT}))
def test_zoo_kernel_matches_reference(name: str, implementation: str) -> None:
    case = build(name)
    float32 = next(case.model.parameters()).dtype == torch.float32
    tol = 2e-4 if float32 else 1e-6
    for kind in KINDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the vmap -> loop note
            if implementation == "ntvp" and case.no_forward_ad:
                with pytest.raises(ForwardADUnsupportedError, match="implementation='auto'"):
                    empirical_ntk(
                        case.model,
                        case.x,
                        kind=kind,
                        implementation="ntvp",
                        output_fn=case.output_fn,
                    )
                return
            k = empirical_ntk(
                case.model,
                case.x,
                kind=kind,
                implementation=implementation,
                output_fn=case.output_fn,
            )
        ref = _reference(name, kind)
        scale = ref.abs().max()
        err = (k.double() - ref).abs().max() / scale
        assert err <= tol, f"{name} {implementation} {kind}: rel err {err:.2e}"
