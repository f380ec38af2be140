"""Metrics against closed forms."""

import math

import pytest
import torch

from cfgdiff.metrics.stats import (
    fid,
    frechet_distance,
    inception_score,
    kid,
    memorisation,
    precision_recall,
)


def test_fid_of_a_set_with_itself_is_zero():
    a = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert abs(fid(a, a)) < 1e-8


def test_frechet_mean_shift_is_squared_distance():
    cov = torch.tensor([[2.0, 0.3], [0.3, 1.0]])
    mu_a, mu_b = torch.tensor([0.0, 1.0]), torch.tensor([3.0, -3.0])
    assert frechet_distance(mu_a, cov, mu_b, cov) == pytest.approx(9 + 16, abs=1e-9)


def test_frechet_diagonal_closed_form():
    va, vb = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = float(((va.sqrt() - vb.sqrt()) ** 2).sum())
    got = frechet_distance(torch.zeros(3), torch.diag(va), torch.zeros(3), torch.diag(vb))
    assert got == pytest.approx(expected, abs=1e-9)


def test_fid_samples_approach_the_gaussian_value():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 4, generator=g)
    b = torch.randn(20000, 4, generator=g) * 2 + 1
    expected = 4 * 1.0 + 4 * (1 - 2) ** 2  # ||mu||^2 + sum (sqrt(1) - sqrt(4))^2
    assert fid(a, b) == pytest.approx(expected, rel=0.03)


def test_kid_matches_brute_force_formula_and_is_unbiased():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 3, generator=g), torch.randn(30, 3, generator=g) + 0.5
    m = 30
    # one subset of the full size: a permutation of all points, so the estimate is exact
    got, _ = kid(x[:m], y, subsets=1, subset_size=m)
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xs = x[:m].double()
    ys = y.double()
    sxx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m)) / (m * m)
    assert got == pytest.approx(float(sxx + syy - 2 * sxy), rel=1e-6)  # summation order
    # same distribution: mean over subsets is near zero (unbiased), shifted: clearly positive
    a, b = torch.randn(3000, 16, generator=g), torch.randn(3000, 16, generator=g)
    same, std = kid(a, b, subsets=20, subset_size=500)
    assert abs(same) < 3 * std + 1e-3
    assert kid(a, b + 1.0, subsets=5, subset_size=500)[0] > 10 * abs(same) + 0.01


def test_inception_score_extremes():
    k = 10
    uniform = torch.zeros(1000, k)
    assert inception_score(uniform, splits=5)[0] == pytest.approx(1.0)
    confident = torch.full((1000, k), -50.0)
    confident[torch.arange(1000), torch.arange(1000) % k] = 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-6)
    # per split, a perfect classifier scores exp(entropy of the split's class histogram); the
    # splits are of the rows shuffled with the seed
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    want = []
    for part in (torch.arange(1000) % k)[perm].chunk(5):
        q = torch.bincount(part, minlength=k).double() / len(part)
        want.append(float(torch.exp(-(q * q.clamp_min(1e-30).log()).sum())))
    assert inception_score(confident, splits=5)[0] == pytest.approx(sum(want) / 5, rel=1e-6)
    # samples sorted by class (a folder, a class grid) are split like any other order: unsorted,
    # 5 splits of this sorted input would each hold 2 classes and score 2
    by_class = confident[(torch.arange(1000) % k).argsort(stable=True)]
    assert inception_score(by_class, splits=5)[0] > 0.9 * k
    one_class = torch.full((1000, k), -50.0)
    one_class[:, 3] = 50.0
    assert inception_score(one_class, splits=5)[0] == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_extremes():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 5, generator=g)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100) == (0.0, 0.0)
    # fake covers half the real modes: precision 1, recall about 1/2
    real = torch.cat(
        [torch.randn(300, 2, generator=g) * 0.1, torch.randn(300, 2, generator=g) * 0.1 + 10]
    )
    fake = torch.randn(300, 2, generator=g) * 0.1
    p, r = precision_recall(real, fake)
    assert p > 0.95 and abs(r - 0.5) < 0.05


def test_memorisation():
    g = torch.Generator().manual_seed(4)
    train = torch.rand(500, 1, 6, 6, generator=g)
    assert memorisation(train[:50], train)["fraction"] == 1.0  # exact copies
    fresh = torch.rand(50, 1, 6, 6, generator=g)
    res = memorisation(fresh, train)
    assert res["fraction"] < 0.1 and math.isfinite(res["threshold"])
    # mirrored copies of training images: missed unless the model trained with flips
    mirrors = train[:50].flip(-1)
    assert memorisation(mirrors, train)["fraction"] < 0.1
    assert memorisation(mirrors, train, mirrored=True)["fraction"] == 1.0
    assert memorisation(fresh, train, mirrored=True)["fraction"] < 0.1


def test_memorisation_with_its_yardstick_computed_once():
    """A reference passes train_nn_distances' result to every measure: the same report as
    computing it inside, for plain and mirrored models."""
    from cfgdiff.metrics.stats import train_nn_distances

    g = torch.Generator().manual_seed(5)
    train = torch.rand(400, 1, 6, 6, generator=g)
    samples = torch.cat([train[:20], torch.rand(30, 1, 6, 6, generator=g)])
    nn_train = train_nn_distances(train)
    assert nn_train.shape == (400,)  # every image when there are fewer than the 2000 probed
    for mirrored in (False, True):
        assert memorisation(samples, train, mirrored, train_nn=nn_train) == memorisation(
            samples, train, mirrored
        )
    assert memorisation(samples, train)["fraction"] == pytest.approx(0.4)  # the 20 copies


def test_class_accuracy_overall_and_per_class():
    from cfgdiff.metrics.classifier import class_accuracy

    logits = torch.eye(3)[[0, 1, 2, 0, 2, 2]]  # predicted 0 1 2 0 2 2
    labels = torch.tensor([0, 1, 2, 1, 1, 2])
    acc, per = class_accuracy(logits, labels)
    assert acc == pytest.approx(4 / 6)
    assert per == pytest.approx([1.0, 1 / 3, 1.0])
