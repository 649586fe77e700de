"""LoRA-XS's default randomised SVD against the exact SVD and against the LoRA-XS authors' recipe
(scikit-learn's randomized_svd as they call it: 10 power iterations normalised by LU, 10 extra
columns), on flat spectra, where a randomised SVD is weakest."""
import pytest
import torch

from peft_ops.svd import top_singular_triplets


def flat_spectrum(n, k, seed, decay):
    """``(W, U, s)``: W = U diag(s) Vᵀ with slowly decaying singular values s (known exactly)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, min(n, k), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(k, min(n, k), generator=g, dtype=torch.float64)).Q
    s = torch.exp(-decay * torch.arange(min(n, k), dtype=torch.float64))
    return u * s @ v.T, u, s


def sklearn_recipe(w, rank, seed, power_iterations=10, oversamples=10):
    """scikit-learn's randomized_range_finder (power_iteration_normalizer='LU') then the small SVD."""
    def lu(a):
        p, l, _ = torch.linalg.lu(a)
        return p @ l

    g = torch.Generator().manual_seed(seed)
    q = w @ torch.randn(w.shape[1], rank + oversamples, generator=g, dtype=torch.float64)
    for _ in range(power_iterations):
        q = w @ lu(w.T @ lu(q))
    q = torch.linalg.qr(q).Q
    return (q @ torch.linalg.svd(q.T @ w, full_matrices=False).U)[:, :rank]


def errors(w, u, s, u_approx, rank):
    """(sine of the largest principal angle to the exact top-r left subspace, share of the top-r
    energy ‖U_rᵀ W‖² missed)."""
    top = u[:, :rank]
    sine = torch.linalg.matrix_norm(u_approx - top @ (top.T @ u_approx), ord=2).item()
    missed = 1 - (torch.linalg.matrix_norm(u_approx.T @ w) ** 2 / (s[:rank] ** 2).sum()).item()
    return sine, missed


@pytest.mark.parametrize("shape, rank, decay", [((192, 128), 16, 0.005), ((128, 192), 12, 0.005)])
def test_default_matches_or_beats_the_authors_recipe(shape, rank, decay):
    ours, theirs = [], []
    for seed in range(3):
        w, u, s = flat_spectrum(*shape, seed, decay)
        ours.append(errors(w, u, s, top_singular_triplets(w, rank, seed=seed)[0], rank))
        theirs.append(errors(w, u, s, sklearn_recipe(w, rank, seed), rank))
    mean = lambda rows, i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
    assert mean(ours, 0) <= mean(theirs, 0)  # subspace angle
    assert mean(ours, 1) <= mean(theirs, 1)  # missed energy


def test_exact_and_randomized_agree_on_a_decaying_spectrum():
    w = flat_spectrum(120, 90, 0, 0.1)[0]
    u_exact, s_exact, v_exact = top_singular_triplets(w, 8, exact=True)
    u, s, v = top_singular_triplets(w, 8)
    assert torch.allclose(s, s_exact, rtol=1e-10)
    assert torch.allclose(u, u_exact, atol=1e-8) and torch.allclose(v, v_exact, atol=1e-8)  # same sign convention
