"""Sample-quality metrics as pure functions of features or logits (torch tensors, float64 math).

- FID (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3,
  averaged over random subsets; good at small N (no bias from the covariance estimate).
- Inception-Score analogue (Salimans et al. 2016) from any classifier's logits:
  exp(E_x KL(p(y|x) || p(y))), mean and std over splits.
- Precision and recall (Kynkäänniemi et al. 2019): a sample is "covered" when it lies inside
  the k-NN ball (k = 3) of some point of the other set; precision = fraction of generated
  samples covered by the real manifold, recall = fraction of real samples covered by the
  generated manifold.
- Memorisation: the fraction of generated samples whose nearest training image is closer than
  the 1st percentile of training images' distances to their own nearest other training image.
"""

from __future__ import annotations

import torch


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def mean_cov(features) -> tuple[torch.Tensor, torch.Tensor]:
    f = _f64(features)
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a^1/2 S_b S_a^1/2)^1/2).

    The trace term uses the symmetric form, whose eigenvalues equal those of S_a S_b, so it is
    computed with a symmetric eigensolver and stays real."""
    mu_a, mu_b, cov_a, cov_b = map(_f64, (mu_a, mu_b, cov_a, cov_b))
    sa = _sqrtm_psd(cov_a)
    inner = torch.linalg.eigvalsh(sa @ cov_b @ sa).clamp_min(0).sqrt().sum()
    diff = mu_a - mu_b
    return float(diff @ diff + cov_a.trace() + cov_b.trace() - 2 * inner)


def fid(features_a, features_b) -> float:
    return frechet_distance(*mean_cov(features_a), *mean_cov(features_b))


def kid(features_a, features_b, subsets: int = 50, subset_size: int = 1000, seed: int = 0):
    """Unbiased MMD^2 (polynomial kernel of degree 3), mean and std over random subsets."""
    a, b = _f64(features_a), _f64(features_b)
    d = a.shape[1]
    m = min(subset_size, a.shape[0], b.shape[0])
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:m]]
        y = b[torch.randperm(b.shape[0], generator=g)[:m]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        vals.append(float(off - 2 * kxy.mean()))
    t = torch.tensor(vals)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


def inception_score(logits, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; returns (mean, std) over splits.

    The rows are shuffled (seeded) before splitting: p(y) is estimated per split, so splits of
    samples sorted by class (a folder, a class grid) would each see one or two classes and
    report a score near 1 for a perfect model."""
    p = torch.softmax(_f64(logits), dim=1)
    p = p[torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(seed))]
    scores = []
    for part in p.chunk(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(py.clamp_min(1e-30)))).sum(1)
        scores.append(float(kl.mean().exp()))
    t = torch.tensor(scores)
    return float(t.mean()), float(t.std()) if len(scores) > 1 else 0.0


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(out)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 2048):
    out = []
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i : i + chunk], ref)
        out.append((d <= radii[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eqs. 1-3)."""
    r, f = _f64(real), _f64(fake)
    precision = _covered(f, r, _kth_nn_radius(r, k)).double().mean()
    recall = _covered(r, f, _kth_nn_radius(f, k)).double().mean()
    return float(precision), float(recall)


def nearest_distance(query, ref, chunk: int = 1024, exclude=None) -> torch.Tensor:
    """Euclidean distance from each query row to its nearest ref row (matmul form).

    exclude: for each query row, the index of a ref row to skip (the query itself)."""
    q, r = torch.as_tensor(query).float(), torch.as_tensor(ref).float()
    r2 = (r * r).sum(1)
    out = []
    for i in range(0, q.shape[0], chunk):
        qi = q[i : i + chunk]
        d2 = (qi * qi).sum(1, keepdim=True) + r2[None] - 2 * qi @ r.T
        if exclude is not None:
            d2[torch.arange(qi.shape[0]), exclude[i : i + chunk]] = float("inf")
        out.append(d2.clamp_min(0).min(dim=1).values.sqrt())
    return torch.cat(out)


def train_nn_distances(train, probe: int = 2000, seed: int = 0) -> torch.Tensor:
    """Distance from `probe` random training images to their nearest other training image (pixel
    space, flattened): the yardstick of memorisation(). It depends only on the training images,
    so a reference computes it once for every set of samples it measures."""
    tr = torch.as_tensor(train).flatten(1).float()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(tr.shape[0], generator=g)[: min(probe, tr.shape[0])]
    return nearest_distance(tr[idx], tr, exclude=idx)


def memorisation(
    generated,
    train,
    mirrored: bool = False,
    probe: int = 2000,
    seed: int = 0,
    train_nn: torch.Tensor | None = None,
) -> dict:
    """Fraction of generated samples closer to a training image than the 1st percentile of
    training images' nearest-other-training-image distances (pixel space, flattened).
    mirrored: the model was trained on mirrored images too (hflip), so a sample's distance is to
    the nearest training image or mirror image (images (N, C, H, W)).
    train_nn: train_nn_distances(train, probe, seed), when already computed."""
    images = torch.as_tensor(generated).float()
    gen = images.flatten(1)
    tr = torch.as_tensor(train).flatten(1).float()
    if train_nn is None:
        train_nn = train_nn_distances(tr, probe, seed)
    threshold = float(torch.quantile(train_nn, 0.01))
    gen_nn = nearest_distance(gen, tr)
    if mirrored:  # |flip(g) - t| = |g - flip(t)|
        gen_nn = torch.minimum(gen_nn, nearest_distance(images.flip(-1).flatten(1), tr))
    return {
        "fraction": float((gen_nn < threshold).float().mean()),
        "threshold": threshold,
        "median_nn_generated": float(gen_nn.median()),
        "median_nn_train": float(train_nn.median()),
    }
