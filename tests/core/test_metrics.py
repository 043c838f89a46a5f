"""Regime metrics on hand-computed cases."""

import math

import pytest
import torch

from lazy_monitor import metrics as M


def _full_from_matrix(mat: torch.Tensor, n: int, o: int) -> torch.Tensor:
    """(N·O, N·O) matrix with rows n·O + a -> (N, N, O, O) kernel."""
    return mat.reshape(n, o, n, o).permute(0, 2, 1, 3).contiguous()


def _psd(m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, m + 3, generator=g, dtype=torch.float64)
    return a @ a.T


# ------------------------------------------------------------------ kernel change / distance


@pytest.mark.parametrize("shape", [(5, 5), (4, 4, 3), (4, 4, 3, 3)])
def test_identical_kernels_have_zero_change_and_distance(shape):
    k = torch.rand(shape)
    assert M.kernel_rel_change(k, k.clone()).item() == 0.0
    assert M.kernel_distance(k, k.clone()).item() == 0.0


@pytest.mark.parametrize("c", [0.5, 2.0, 3.7])
def test_scaled_kernel_distance_zero_and_rel_change_abs_c_minus_1(c):
    k0 = _full_from_matrix(_psd(12), 4, 3)
    assert M.kernel_distance(c * k0, k0).item() == pytest.approx(0.0, abs=1e-12)
    assert M.kernel_rel_change(c * k0, k0).item() == pytest.approx(abs(c - 1), rel=1e-12)


def test_identity_kernel_rel_change_by_hand():
    eye = torch.eye(4)
    # ‖2I − I‖ / ‖I‖ = 1;  ‖I + E_01‖ change: ‖E_01‖/‖I‖ = 1/2
    assert M.kernel_rel_change(2 * eye, eye).item() == pytest.approx(1.0)
    bumped = eye.clone()
    bumped[0, 1] = 1.0
    assert M.kernel_rel_change(bumped, eye).item() == pytest.approx(0.5)


def test_orthogonal_kernels_have_distance_one():
    k1 = torch.diag(torch.tensor([1.0, 0.0, 0.0]))
    k2 = torch.diag(torch.tensor([0.0, 2.0, 5.0]))
    assert M.kernel_distance(k1, k2).item() == pytest.approx(1.0)


def test_distance_by_hand():
    # <I, 11ᵀ> = 3, ‖I‖ = √3, ‖11ᵀ‖ = 3  ->  1 − 3/(3√3)
    assert M.kernel_distance(torch.eye(3), torch.ones(3, 3)).item() == pytest.approx(
        1 - 1 / math.sqrt(3)
    )


def test_zero_kernel_conventions():
    z, k = torch.zeros(3, 3), torch.eye(3)
    assert M.kernel_rel_change(z, z).item() == 0.0
    assert M.kernel_rel_change(k, z).item() == math.inf
    assert M.kernel_distance(z, z).item() == 0.0
    assert M.kernel_distance(z, k).item() == 1.0


def test_mismatched_shapes_raise_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(4, 4\)"):
        M.kernel_distance(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="expected a kernel"):
        M.kernel_rel_change(torch.ones(3), torch.ones(3))


# ------------------------------------------------------------------ alignment


@pytest.mark.parametrize("kind", ["full", "diagonal", "trace"])
def test_alignment_of_target_kernel_is_one(kind):
    n, o = 6, 3
    y = torch.tensor([0, 1, 2, 0, 1, 1])
    yo = torch.nn.functional.one_hot(y, o).double()
    if kind == "full":
        k = torch.einsum("na,mb->nmab", yo, yo)
    elif kind == "diagonal":
        k = torch.einsum("na,ma->nma", yo, yo)
    else:
        k = yo @ yo.T
    assert M.kernel_alignment(k, y).item() == pytest.approx(1.0, abs=1e-12)
    assert M.kernel_alignment(k, yo).item() == pytest.approx(1.0, abs=1e-12)  # regression form
    assert k.shape[0] == n


def test_alignment_regression_targets_and_orthogonal_structure():
    y = torch.tensor([1.0, -1.0, 2.0, -2.0])
    assert M.kernel_alignment(torch.outer(y, y), y).item() == pytest.approx(1.0)
    # A centred kernel orthogonal to the centred targets has alignment 0.
    v = torch.tensor([1.0, 1.0, -1.0, -1.0])  # centred, ⟂ y
    assert torch.dot(v, y) == 0
    assert M.kernel_alignment(torch.outer(v, v), y).item() == pytest.approx(0.0, abs=1e-12)


def test_alignment_is_invariant_to_constant_kernel_offset():
    # Centring removes the constant (bias) direction: K and K + c 11ᵀ align equally.
    y = torch.tensor([0, 1, 1, 0, 2])
    k = _psd(5, seed=3)
    a1 = M.kernel_alignment(k, y, num_classes=3)
    a2 = M.kernel_alignment(k + 7.0, y, num_classes=3)
    assert a1.item() == pytest.approx(a2.item(), rel=1e-10)


def test_alignment_zero_cases():
    y = torch.tensor([0, 1, 0, 1])
    assert M.kernel_alignment(torch.ones(4, 4), y).item() == 0.0  # K_c = 0
    assert math.isnan(M.kernel_alignment(torch.eye(4), torch.zeros(4, dtype=torch.long)).item())


def test_alignment_validates_targets():
    k = torch.rand(4, 4, 3, 3)
    with pytest.raises(ValueError, match="one target per probe example"):
        M.kernel_alignment(k, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="class index 3 is outside"):
        M.kernel_alignment(k, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes=4 but the kernel has 3 outputs"):
        M.kernel_alignment(k, torch.tensor([0, 1, 2, 0]), num_classes=4)
    with pytest.raises(ValueError, match="2 values per example but the kernel has 3"):
        M.kernel_alignment(k, torch.rand(4, 2))


# ------------------------------------------------------------------ spectrum


def test_full_kernel_matrix_layout():
    k = torch.zeros(2, 2, 3, 3)
    k[1, 0, 2, 1] = 5.0
    mat = M.kernel_matrix(k)
    assert mat.shape == (6, 6) and mat[1 * 3 + 2, 0 * 3 + 1] == 5.0 and mat.sum() == 5.0


def test_spectrum_of_full_kernel_matches_eigvalsh():
    mat = _psd(12)
    vals, vecs = M.kernel_spectrum(_full_from_matrix(mat, 4, 3))
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(mat))
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, mat)


def test_diagonal_kernel_spectrum_equals_block_diagonal_matrix():
    n, o = 4, 3
    k = torch.stack([_psd(n, seed=s) for s in range(o)], dim=-1)  # (N, N, O)
    mat = M.kernel_matrix(k)
    assert mat.shape == (n * o, n * o)
    vals, vecs = M.kernel_spectrum(k)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(mat))
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, mat)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(n * o, dtype=torch.float64))


def test_rank_one_spectrum():
    v = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    vals, _ = M.kernel_spectrum(torch.outer(v, v))
    stats = M.spectrum_stats(vals)
    assert stats["eff_rank"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["eig_max"].item() == pytest.approx(v.square().sum().item())
    assert stats["trace"].item() == pytest.approx(v.square().sum().item())
    # singular: capped at 1/rtol (rtol = M·eps), rank 1, never inf
    rtol = M.spectral_rtol(4, torch.float64)
    assert stats["cond"].item() == pytest.approx(1 / rtol)
    assert stats["log10_cond"].item() == pytest.approx(math.log10(1 / rtol))
    assert stats["rank"].item() == 1.0


def test_condition_number_ignores_round_off_of_a_float32_kernel():
    # A float32 kernel of rank 3 in 6 dims, decomposed in float64 (as the tracker does): the
    # zero eigenvalues come out as float32 round-off of either sign. cond/rank must read them
    # as zero at float32 precision, the same for every seed (no inf, no 1e8-vs-1e5 jumps).
    conds = set()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        j = torch.randn(6, 3, generator=g)
        k32 = j @ j.T  # float32
        vals = torch.linalg.eigvalsh(k32.to(torch.float64))
        assert vals.min() != 0.0  # round-off, as in practice
        rtol = M.spectral_rtol(6, torch.float32)
        stats = M.spectrum_stats(vals, rtol)
        assert stats["rank"].item() == 3.0
        assert math.isfinite(stats["cond"].item())
        conds.add(round(stats["log10_cond"].item(), 6))
        # full-rank part: the real condition number of the nonsingular block
        ok = M.spectrum_stats(torch.linalg.eigvalsh((j.T @ j).to(torch.float64)), rtol)
        want = torch.linalg.eigvalsh((j.T @ j).double())
        assert ok["cond"].item() == pytest.approx((want.max() / want.min()).item(), rel=1e-9)
        assert ok["rank"].item() == 3.0
    assert conds == {round(math.log10(1 / M.spectral_rtol(6, torch.float32)), 6)}


def test_condition_number_all_zero_and_nonfinite():
    assert math.isnan(M.condition_number(torch.zeros(3)).item())
    assert M.numerical_rank(torch.zeros(3)).item() == 0.0
    assert math.isnan(M.numerical_rank(torch.tensor([1.0, float("nan")])).item())


def test_identity_spectrum_stats():
    stats = M.spectrum_stats(M.kernel_spectrum(3.0 * torch.eye(5))[0])
    assert stats["eff_rank"].item() == pytest.approx(5.0)
    assert stats["cond"].item() == pytest.approx(1.0)
    assert stats["eig_min"].item() == pytest.approx(3.0)
    assert stats["trace"].item() == pytest.approx(15.0)


def test_effective_rank_uniform_over_two_eigenvalues_and_zero_spectrum():
    assert M.effective_rank(torch.tensor([0.0, 4.0, 4.0])).item() == pytest.approx(2.0)
    assert M.effective_rank(torch.zeros(3)).item() == 0.0


def test_eigenspace_overlap():
    eye = torch.eye(4, dtype=torch.float64)
    assert M.eigenspace_overlap(eye[:, :2], eye[:, :2]).item() == pytest.approx(1.0)
    assert M.eigenspace_overlap(eye[:, :2], eye[:, 2:]).item() == 0.0
    # A rotation inside the span keeps the overlap at 1; half-in gives 1/2.
    c = math.cos(0.3)
    s = math.sin(0.3)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    assert M.eigenspace_overlap(eye[:, :2], eye[:, :2] @ rot).item() == pytest.approx(1.0)
    assert M.eigenspace_overlap(eye[:, :2], eye[:, 1:3]).item() == pytest.approx(0.5)


def test_spectrum_rejects_rectangular_kernel():
    with pytest.raises(ValueError, match="square kernel"):
        M.kernel_spectrum(torch.rand(3, 4))


# ------------------------------------------------------------------ parameters


def test_param_change_global_and_per_layer():
    p0 = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2), "b.weight": torch.full((4,), 2.0)}
    p = {
        "a.weight": torch.ones(2, 2),
        "a.bias": torch.tensor([3.0, 4.0]),
        "b.weight": p0["b.weight"],
    }
    # ‖Δθ‖ = 5, ‖θ0‖ = sqrt(4 + 16) = sqrt(20)
    assert M.param_distance(p, p0).item() == pytest.approx(5.0)
    assert M.param_rel_change(p, p0).item() == pytest.approx(5 / math.sqrt(20))
    # per layer, in units of the whole model's ‖θ0‖: the squares add up to the total's
    layers = M.param_rel_change_by_layer(p, p0)
    assert list(layers) == ["a", "b"]
    assert layers["a"].item() == pytest.approx(5 / math.sqrt(20)) and layers["b"].item() == 0.0
    per_param = M.param_rel_change_by_layer(p, p0, groups={k: [k] for k in p})
    assert per_param["a.bias"].item() == pytest.approx(5 / math.sqrt(20))  # θ0 = 0: finite
    assert sum(v.item() ** 2 for v in per_param.values()) == pytest.approx(5**2 / 20)
    # relative_to="group": the group's own ‖θ0,g‖ (inf for the zero-initialised bias)
    own = M.param_rel_change_by_layer(p, p0, groups={k: [k] for k in p}, relative_to="group")
    assert own["a.bias"].item() == math.inf and own["a.weight"].item() == 0.0
    assert M.param_rel_change_by_layer(p, p0, relative_to="group")["a"].item() == 2.5
    with pytest.raises(ValueError, match="relative_to must be 'model' or 'group', got 'layer'"):
        M.param_changes(p, p0, relative_to="layer")
    assert M.layer_name("scale") == "scale" and M.layer_name("net.0.weight") == "net.0"


def test_param_change_validates_names_and_shapes():
    with pytest.raises(ValueError, match="missing from params"):
        M.param_rel_change({"a": torch.ones(1)}, {"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(ValueError, match=r"params\['a'\] has shape \(2,\)"):
        M.param_rel_change({"a": torch.ones(2)}, {"a": torch.ones(3)})


# ------------------------------------------------------------------ linearization


def test_linearization_error_rmse_agreement_by_hand():
    f0 = torch.zeros(2, 2)
    f = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    f_lin = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert M.linearization_error(f, f_lin, f0).item() == pytest.approx(3 / 5)
    assert M.linearization_rmse(f, f_lin).item() == pytest.approx(math.sqrt(9 / 4))
    assert M.argmax_agreement(f, f_lin).item() == 1.0
    assert M.argmax_agreement(f, torch.tensor([[0.0, 1.0], [0.0, 1.0]])).item() == 0.5
    # one logit per example: class = sign
    assert M.argmax_agreement(torch.tensor([[1.0], [-1.0]]), torch.tensor([[2.0], [1.0]])) == 0.5


def test_linearization_error_zero_over_zero():
    f = torch.rand(3, 2)
    assert M.linearization_error(f, f.clone(), f.clone()).item() == 0.0
    assert M.linearization_error(f, f + 1, f.clone()).item() == math.inf
    # rounding-level differences below atol count as none: 0/0 -> 0, not noise/noise
    noisy = f + 1e-7
    assert M.linearization_error(noisy, f, f).item() == pytest.approx(1.0)
    assert M.linearization_error(noisy, f, f, atol=1e-5).item() == 0.0
    assert M.linearization_error(f + 1, f + 1e-7, f, atol=1e-5).item() == pytest.approx(1.0)


# ------------------------------------------------------------------ non-finite input


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_give_nan_not_exception(bad):
    k = torch.eye(4)
    kb = k.clone()
    kb[1, 2] = bad
    y = torch.tensor([0, 1, 0, 1])
    assert math.isnan(M.kernel_rel_change(kb, k).item())
    assert math.isnan(M.kernel_rel_change(k, kb).item())
    assert math.isnan(M.kernel_distance(kb, k).item())
    assert math.isnan(M.kernel_alignment(kb, y).item())
    vals, vecs = M.kernel_spectrum(kb)
    assert vals.isnan().all() and vecs.isnan().all()
    assert all(math.isnan(v.item()) for v in M.spectrum_stats(vals).values())
    assert math.isnan(M.eigenspace_overlap(vecs[:, :2], torch.eye(4)[:, :2]).item())
    p0 = {"w": torch.ones(3)}
    pb = {"w": torch.tensor([1.0, bad, 1.0])}
    assert math.isnan(M.param_rel_change(pb, p0).item())
    assert math.isnan(M.param_distance(pb, p0).item())
    assert math.isnan(M.param_rel_change_by_layer(pb, p0)["w"].item())
    f = torch.rand(4, 2)
    fb = f.clone()
    fb[0, 0] = bad
    assert math.isnan(M.linearization_error(fb, f, f).item())
    assert math.isnan(M.linearization_rmse(f, fb).item())
    assert math.isnan(M.argmax_agreement(fb, f).item())
    assert not M.all_finite(k, {"w": kb}) and M.all_finite(k, [f], p0)


def test_results_are_float64_even_for_float32_inputs():
    k = torch.rand(3, 3, dtype=torch.float32)
    assert M.kernel_distance(k, k + 1).dtype == torch.float64
    # float32 accumulation would lose this: ‖K − K0‖ ≈ 1e-7·‖K0‖ on a large kernel
    k0 = torch.ones(1000, 1000, dtype=torch.float32)
    k1 = k0.clone()
    k1[0, 0] += 1e-3
    assert M.kernel_rel_change(k1, k0).item() == pytest.approx(1e-3 / 1000, rel=1e-3)


def test_trace_alignment_with_class_indices_equals_one_hot_brute_force():
    # The trace alignment is built from [y_n = y_m] (no one-hot): same value as the explicit
    # one-hot formula ⟨HKH, H Y Yᵀ H⟩ / (‖HKH‖ ‖H Y Yᵀ H‖), for class counts far above max + 1.
    g = torch.Generator().manual_seed(3)
    j = torch.randn(7, 4, generator=g, dtype=torch.float64)
    k = j @ j.T
    y = torch.tensor([4, 0, 4, 2, 0, 0, 9])
    h = torch.eye(7, dtype=torch.float64) - 1.0 / 7
    yy = torch.nn.functional.one_hot(y, 12).double()
    kc, lc = h @ k @ h, h @ yy @ yy.T @ h
    expected = (kc * lc).sum() / (kc.norm() * lc.norm())
    for num_classes in (None, 12, 50257):
        got = M.kernel_alignment(k, y, num_classes=num_classes)
        assert got.item() == pytest.approx(expected.item(), abs=1e-12)
    with pytest.raises(ValueError, match="class index 9 is outside"):
        M.kernel_alignment(k, y, num_classes=5)


def test_kernel_layer_changes_in_units_of_the_total_reference_kernel():
    # Two layers; layer "b"'s reference block is exactly 0 (LoRA's lora_A while lora_B = 0).
    g = torch.Generator().manual_seed(5)
    ja, jb = (torch.randn(5, 2, 7, generator=g, dtype=torch.float64) for _ in range(2))
    ka0 = torch.einsum("nap,mbp->nmab", ja, ja)
    kb0 = torch.zeros_like(ka0)
    ka = ka0 * 1.1
    kb = 0.01 * torch.einsum("nap,mbp->nmab", jb, jb)
    k0 = ka0 + kb0
    out = M.kernel_layer_changes({"a": ka, "b": kb}, {"a": ka0, "b": kb0}, k0)
    assert list(out) == ["a", "b"]
    assert out["a"].item() == pytest.approx(0.1, rel=1e-12)  # ‖0.1 K_a0‖ / ‖K0‖, K0 = K_a0
    assert out["b"].item() == pytest.approx((kb.norm() / k0.norm()).item(), rel=1e-12)
    assert math.isfinite(out["b"].item()) and M.kernel_rel_change(kb, kb0).item() == math.inf
    # the sum bounds the total change (triangle inequality)
    total = M.kernel_rel_change(ka + kb, k0).item()
    assert total <= out["a"].item() + out["b"].item() + 1e-12
    # one layer: the kernel's own relative change; unchanged layers exactly 0
    assert M.kernel_layer_changes({"a": ka}, {"a": ka0}, ka0)["a"].item() == pytest.approx(0.1)
    assert M.kernel_layer_changes({"a": ka0}, {"a": ka0}, k0)["a"].item() == 0.0
    # non-finite input: NaN for that layer only; K0 = 0: 0 unchanged, inf moved
    bad = M.kernel_layer_changes({"a": ka * math.nan, "b": kb}, {"a": ka0, "b": kb0}, k0)
    assert math.isnan(bad["a"].item()) and math.isfinite(bad["b"].item())
    z = torch.zeros_like(k0)
    assert M.kernel_layer_changes({"a": z}, {"a": z}, z)["a"].item() == 0.0
    assert M.kernel_layer_changes({"a": kb}, {"a": z}, z)["a"].item() == math.inf
    with pytest.raises(ValueError, match="layers \\['c'\\] have no reference"):
        M.kernel_layer_changes({"c": ka}, {"a": ka0}, k0)


@pytest.mark.parametrize("kind", ["full", "diagonal", "trace"])
def test_alignment_equals_explicit_matrix_formula(kind):
    # ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) on the (N·O) × (N·O) matrices (N × N for trace), H = H_N ⊗ I_O
    g = torch.Generator().manual_seed(7)
    n, o = 6, 3
    j = torch.randn(n, o, 5, generator=g, dtype=torch.float64)
    full = torch.einsum("nap,mbp->nmab", j, j)
    kernel = {
        "full": full,
        "diagonal": torch.diagonal(full, dim1=2, dim2=3),
        "trace": torch.einsum("nmaa->nm", full),
    }[kind]
    y = torch.randn(n, o, generator=g, dtype=torch.float64)
    hn = torch.eye(n, dtype=torch.float64) - 1.0 / n
    if kind == "trace":
        h, mat, lmat = hn, kernel, y @ y.T
    else:
        h = torch.kron(hn, torch.eye(o, dtype=torch.float64))
        mat, v = M.kernel_matrix(kernel), y.reshape(-1)
        lmat = torch.outer(v, v)
        if kind == "diagonal":  # keep the δ_ab blocks only
            same = torch.eye(o, dtype=torch.bool).repeat(n, n)
            lmat = torch.where(same, lmat, torch.zeros_like(lmat))
    kc, lc = h @ mat @ h, h @ lmat @ h
    expected = (kc * lc).sum() / (kc.norm() * lc.norm())
    before = kernel.clone()
    assert M.kernel_alignment(kernel, y).item() == pytest.approx(expected.item(), abs=1e-12)
    assert torch.equal(kernel, before)  # a float64 kernel is not centred in place
