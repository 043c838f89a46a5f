"""One engine configuration, validated in one place: :class:`NtkConfig`.

Every option of :func:`~lazy_monitor.core.kernels.empirical_ntk` that is not data (kind,
implementation, projection, chunking, memory budget) is checked here once, with one wording per
mistake: ``TypeError`` for a value of the wrong type, ``ValueError`` for a value of the right
type that is not allowed; both name the argument, the value and the fix. The implementations
receive the frozen object and never re-validate.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional, Union

__all__ = [
    "KINDS",
    "MAX_SEED",
    "NtkConfig",
    "NtkImplementation",
    "check_projection",
    "check_projection_seed",
]

KINDS = ("full", "trace", "diagonal")
#: Largest ``projection_seed``: ``torch.Generator.manual_seed`` takes a 64-bit unsigned seed.
MAX_SEED = 2**64 - 1


class NtkImplementation(str, enum.Enum):
    """How :func:`~lazy_monitor.core.kernels.empirical_ntk` computes ``K = J Jᵀ`` (Novak et al.
    2022, Tables 1–2).

    Notation: N examples, O outputs per example, P parameters, [FP] the cost of one forward
    pass, per layer ``T`` positions (sequence length / output pixels), ``d_in``/``d_out`` its
    input/output features.

    * ``JACOBIAN`` -- materialise per-example Jacobian rows ``J_p (N, O, P_p)`` one parameter
      block at a time (``vmap(jacrev)``; a per-example loop of ``torch.autograd.grad`` where
      ``vmap`` cannot run the model, with one warning) and contract ``J_p J_pᵀ``. Time
      ``N·O·[FP] + N²O²P``, memory ``N·O·max_p P_p``. The reference baseline.
    * ``NTVP`` -- NTK-vector products: for each row ``(n, a)`` a vjp gives ``J[n, a]`` and one
      jvp through the whole second batch gives the column ``J(x2) J[n, a]ᵀ``. Time
      ``N²·O·[FP]``, memory ``chunk·O·P``. Needs forward-mode AD for every op of the model
      (raises :class:`~lazy_monitor.core.kernels.errors.ForwardADUnsupportedError` otherwise).
    * ``STRUCTURED`` -- per-layer factorisation: for a weight used as ``y = a Wᵀ`` (Linear
      with any leading dims, Conv1d/2d via unfold, Embedding via index matching) the
      per-example gradient is ``G_{na}ᵀ A_n`` with ``G`` the output-gradients at the layer
      output and ``A`` the layer input, contracted per layer with the cheapest exact strategy
      of :mod:`lazy_monitor.core.kernels.cost`. Biases, norm affines and parameters broadcast
      over the examples (``x * P``, ``x + P``, ``P.expand(N, ...)``) get direct per-example
      rows; a layer on an input shared by the batch (position ids ``(1, T)``) is expanded to
      it. Every parameter use's batch mapping is verified on two probe examples; parameters
      without a verified structured rule (custom ops, weights used as a left ``matmul``
      operand, sequence-first layouts, tied weights with mixed uses) fall back to
      ``JACOBIAN`` inside the same call, so the result is always exact. Raises
      :class:`~lazy_monitor.core.kernels.errors.StructuredPlanError` if the uses change
      between examples (data-dependent control flow).
    * ``AUTO`` -- the default: the cheapest of ``STRUCTURED`` (with its Jacobian remainder),
      a mix (parameters cheaper as Jacobian rows join the remainder) and ``JACOBIAN`` for the
      whole call, priced by :func:`lazy_monitor.core.kernels.cost.choose_path` (passes,
      contractions and per-call costs; the decision is reused for the same shapes); and
      ``JACOBIAN`` for the whole call (one warning) when the structured plan cannot be made or
      verified (any failure of the structured attempt but a memory refusal, e.g.
      data-dependent control flow).
      Never picks ``NTVP``.

    When to choose: ``AUTO`` always, except to cross-check (``JACOBIAN`` is the most direct
    formula) or when ``N`` is tiny and a single Jacobian row block would not fit (``NTVP``).
    """

    JACOBIAN = "jacobian"
    NTVP = "ntvp"
    STRUCTURED = "structured"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: Union[str, NtkImplementation]) -> NtkImplementation:
        if isinstance(value, cls):
            return value
        allowed = ", ".join(repr(m.value) for m in cls)
        if not isinstance(value, str):
            raise TypeError(
                f"`implementation` must be a string, one of {allowed}, got "
                f"{type(value).__name__} {value!r}"
            )
        try:
            return cls(value.lower())
        except ValueError:
            raise ValueError(f"`implementation` must be one of {allowed}, got {value!r}") from None


def _positive_int(name: str, value: Any, what: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a positive int ({what}) or None, got {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int ({what}) or None, got {value!r}")
    return value


def check_projection(value: Any) -> Union[None, int, str]:
    """``None``, an int ``k >= 1`` or ``"sum"`` (the one check of ``projection``, also used by
    :class:`~lazy_monitor.tracking.KernelConfig`)."""
    if isinstance(value, str):
        if value != "sum":
            raise ValueError(f"`projection` must be None, a positive int k or 'sum', got {value!r}")
        return value
    return _positive_int("projection", value, "number of random output directions k")


def check_projection_seed(value: Any) -> int:
    """An int in ``[0, MAX_SEED]`` (what ``torch.Generator.manual_seed`` accepts without
    wrapping): the one check of ``projection_seed``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`projection_seed` must be an int, got {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(
            f"`projection_seed` must be an int in [0, 2**64 - 1] (a torch.Generator seed), got "
            f"{value!r}; pass a smaller seed, e.g. projection_seed=0 or value % 2**64"
        )
    return value


@dataclasses.dataclass(frozen=True)
class NtkConfig:
    """The engine's options, validated at construction (see module docstring).

    Attributes:
        kind: ``"full"`` | ``"trace"`` | ``"diagonal"``.
        implementation: an :class:`NtkImplementation`.
        projection: ``None`` (exact outputs), ``k`` (int >= 1: the kernel of
            ``g(x) = Rᵀ f(x) / √k``, ``R ∈ ℝ^{O×k}`` i.i.d. N(0, 1) drawn from
            ``projection_seed``) or ``"sum"`` (pseudo-NTK: the kernel of ``Σ_o f_o(x) / √O``).
        projection_seed: seed of ``R``'s own ``torch.Generator`` (same seed -> same ``R``).
        chunk_size: examples per block of held factors, or None (memory budget decides).
        max_memory: bytes the engine may use for factors, or None (the default budget).
    """

    kind: str = "full"
    implementation: NtkImplementation = NtkImplementation.AUTO
    projection: Union[None, int, str] = None
    projection_seed: int = 0
    chunk_size: Optional[int] = None
    max_memory: Optional[int] = None

    def __post_init__(self) -> None:
        kind = self.kind
        if not isinstance(kind, str):
            raise TypeError(
                f"`kind` must be a string, one of {', '.join(map(repr, KINDS))}, got "
                f"{type(kind).__name__} {kind!r}"
            )
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        object.__setattr__(self, "implementation", NtkImplementation.parse(self.implementation))
        check_projection(self.projection)
        check_projection_seed(self.projection_seed)
        _positive_int("chunk_size", self.chunk_size, "examples per block")
        _positive_int("max_memory", self.max_memory, "bytes")

    def as_dict(self) -> dict[str, Any]:
        """Plain values (``implementation`` as its string), e.g. for hparams/checkpoints."""
        d = dataclasses.asdict(self)
        d["implementation"] = self.implementation.value
        return d
