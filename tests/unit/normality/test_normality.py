import numpy as np
import pytest

from vitad_ray.normality.crossclip import CrossClipNormality
from vitad_ray.normality.estimators import (HDBSCANNormality, KMeansNormality, k_range,
                                            knnn_confidence, knnn_ratio, local_density)
from vitad_ray.search.knn import ProjectedSearch, knn, knn_stacked, pairwise_distances


def test_confidence_rule_hand_cases():
    d = np.array([0.5, 2.0, 0.3, 0.0, 1.0])
    loc = np.array([1.0, 1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(knnn_confidence(d, loc), [0.5, 1.0, 1.0, 1.0, 1.0])
    ratio = knnn_ratio(d, loc)
    assert ratio[0] == pytest.approx(0.5) and ratio[1] == pytest.approx(2.0)
    assert np.isinf(ratio[2]) and ratio[3] == 0.0


def test_local_density_hand_computed():
    # Cluster 0: seven points on a line (m = 5); cluster 1: three points (fewer than m others);
    # cluster 2: a singleton.
    x = np.array([0, 1, 2, 3, 4, 5, 6, 10, 12, 15, 100], np.float32)[:, None]
    labels = np.array([0] * 7 + [1] * 3 + [2])
    loc = local_density(x, labels, m=5)
    assert loc[0] == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert loc[3] == pytest.approx((1 + 1 + 2 + 2 + 3) / 5)
    assert loc[6] == pytest.approx(3.0)
    assert loc[7] == pytest.approx((2 + 5) / 2)   # uses all its other members
    assert loc[9] == pytest.approx((5 + 3) / 2)
    assert loc[10] == 0.0                         # singleton


def test_local_density_duplicates_give_zero_and_confidence_one():
    x = np.zeros((6, 3), np.float32)
    loc = local_density(x, np.zeros(6, int), m=5)
    assert np.all(loc == 0)
    est = KMeansNormality.from_state(x, np.zeros(6, int), loc)
    assert np.all(est.score_samples(np.zeros((2, 3), np.float32)) == 1.0)


def test_kmeans_confidence_is_distance_over_loc_dens_of_nearest():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (30, 4)), rng.normal(20, 1, (30, 4))]).astype(np.float32)
    est = KMeansNormality(k_max=4).fit(x)
    assert est.k_ == 2
    q = np.vstack([x[:3] + 0.01, rng.normal(10, 1, (3, 4))]).astype(np.float32)
    conf = est.score_samples(q)
    brute = np.linalg.norm(q[:, None] - x[None], axis=-1)
    nn = brute.argmin(1)
    expected = np.minimum(1.0, brute.min(1) / est.loc_dens_[nn])
    np.testing.assert_allclose(conf, expected, rtol=1e-5)
    assert np.all(conf[3:] == 1.0) and np.all(conf[:3] < 0.2)


@pytest.mark.parametrize("true_k", [3, 5])
def test_silhouette_chooses_k_of_blobs(true_k):
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(400, n_features=16, centers=true_k, cluster_std=1.0, random_state=1)
    est = KMeansNormality(k_max=8).fit(x.astype(np.float32))
    assert est.k_ == true_k
    assert set(est.silhouette_by_k_) == set(range(2, 9))
    assert est.silhouette_ == max(est.silhouette_by_k_.values())


def _partition(labels: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(tuple(np.flatnonzero(labels == c)) for c in np.unique(labels))


def test_kmeans_update_equals_a_refit_on_every_vector():
    """New normal vectors added to a fitted scope: the clusters, loc_dens and confidences are a
    refit's on all the vectors, exactly, where the scene's clusters are stable (here 4 blobs,
    as a camera's few kinds of normal frames). Clusters no new vector reached keep their
    loc_dens untouched."""
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(480, n_features=24, centers=4, cluster_std=1.0, random_state=3)
    x = x.astype(np.float32)
    first, later = x[:200], x[200:]
    refit = KMeansNormality(k_max=6).fit(x)
    updated = KMeansNormality(k_max=6).fit(first).update(later)
    assert updated.k_ == refit.k_ == 4 and updated.clusters_changed_ == 4
    assert _partition(updated.labels_) == _partition(refit.labels_)
    np.testing.assert_array_equal(updated.loc_dens_, refit.loc_dens_)
    q = np.vstack([x[::7] + 0.3, np.full((3, 24), 40.0, np.float32)]).astype(np.float32)
    np.testing.assert_array_equal(updated.score_samples(q), refit.score_samples(q))
    # New vectors of one kind only: the other clusters' loc_dens stay as they were.
    base = KMeansNormality(k_max=6).fit(first)
    before = base.loc_dens_.copy()
    one_kind = base.labels_[0]
    near = first[base.labels_ == one_kind][:5] + 0.01
    base.update(near)
    assert base.clusters_changed_ == 1
    untouched = np.flatnonzero(base.labels_[:200] != one_kind)
    np.testing.assert_array_equal(base.loc_dens_[untouched], before[untouched])


def test_k_range_follows_training_clips():
    assert k_range(16) == (2, 8)
    assert k_range(3) == (2, 2)
    assert k_range(400) == (2, 50)


def test_hdbscan_matches_reference_approximate_predict():
    import hdbscan
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(600, n_features=32, centers=4, cluster_std=2.0, random_state=3)
    x = x.astype(np.float32)
    ours = HDBSCANNormality().fit(x)
    ref = hdbscan.HDBSCAN(min_cluster_size=40, min_samples=40, prediction_data=True).fit(
        x.astype(np.float64))
    assert ours.n_clusters_ == ref.labels_.max() + 1 == 4
    np.testing.assert_array_equal(ours.model_.labels_, ref.labels_)
    rng = np.random.default_rng(0)
    q = np.vstack([x[:50] + rng.normal(0, 1.0, (50, 32)), rng.normal(0, 30, (10, 32))])
    _, strength = hdbscan.approximate_predict(ref, q.astype(np.float64))
    np.testing.assert_allclose(ours.score_samples(q.astype(np.float32)), 1 - strength, atol=1e-6)
    assert ours.score_samples(q[50:].astype(np.float32)).mean() > 0.9


def test_exact_knn_matches_brute_force_and_refines_distances():
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, (3, 200, 24)).astype(np.float32)
    queries = np.concatenate([train[:, :5] + 1e-4, rng.normal(0, 1, (3, 7, 24))], axis=1)
    dist, idx = knn_stacked(queries.astype(np.float32), train, k=4)
    for s in range(3):
        brute = np.linalg.norm(queries[s][:, None].astype(np.float64) - train[s][None], axis=-1)
        np.testing.assert_array_equal(idx[s], np.argsort(brute, axis=1)[:, :4])
        np.testing.assert_allclose(dist[s], np.sort(brute, axis=1)[:, :4], rtol=1e-4, atol=1e-6)
    d1, i1 = knn(queries[0], train[0], k=1)
    assert d1.shape == (12, 1) and np.all(i1[:5, 0] == np.arange(5))
    pd = pairwise_distances(train[0][:10])
    assert np.allclose(np.diag(pd), 0) and np.allclose(pd, pd.T)


def test_projected_search_is_exact_and_falls_back_when_it_cannot_certify():
    rng = np.random.default_rng(3)
    # Vectors far from the origin, near a 6-dimensional subspace of R^48 (as patch features
    # mostly vary along a few directions), with a little noise off it.
    basis = rng.normal(0, 1, (4, 6, 48))
    train = 50 + np.einsum("snk,skd->snd", rng.normal(0, 3, (4, 600, 6)), basis)
    train = (train + rng.normal(0, 0.05, train.shape)).astype(np.float32)
    queries = np.concatenate([
        train[:, :6] + rng.normal(0, 0.05, (4, 6, 48)),
        50 + np.einsum("snk,skd->snd", rng.normal(0, 4, (4, 10, 6)), basis)
        + rng.normal(0, 0.2, (4, 10, 48))], axis=1).astype(np.float32)
    index = ProjectedSearch(train, dims=8, spare=16)
    for k in (1, 5):
        dist, idx = index.search(queries, k=k)
        ref_d, ref_i = knn_stacked(queries, train, k=k)
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_array_equal(dist, ref_d)
    assert index.certified_ > 0.9 * (index.certified_ + index.fallback_)
    # A subset of scopes, as a serving shard asks for.
    dist, idx = index.search(queries[1:3], k=2, scopes=slice(1, 3))
    np.testing.assert_array_equal(idx, knn_stacked(queries[1:3], train[1:3], k=2)[1])
    # Sixty near-copies of each of 10 vectors: more copies of the nearest one than candidates,
    # so the bound cannot rule the rest out and nothing certifies in the first round. The second
    # round (8x the candidates) takes in every copy and certifies, giving the true order (which
    # float32 ranking of the full search cannot resolve among copies 1e-4 apart); without it
    # (1x), every answer goes to the full search.
    base = (50 + rng.normal(0, 3, (1, 10, 48))).astype(np.float32)
    dupes = np.repeat(base, 60, axis=1) + rng.normal(0, 1e-4, (1, 600, 48)).astype(np.float32)
    q = (base[:, :5] + rng.normal(0, 0.5, (1, 5, 48))).astype(np.float32)
    brute = np.linalg.norm(q[0][:, None].astype(np.float64) - dupes[0][None], axis=-1)
    tight = ProjectedSearch(dupes, dims=8, spare=16, second_round=8)
    np.testing.assert_array_equal(tight.search(q, k=3)[1][0], np.argsort(brute, axis=1)[:, :3])
    assert (tight.certified_, tight.second_round_, tight.fallback_) == (0, 5, 0)
    tight = ProjectedSearch(dupes, dims=8, spare=16, second_round=1)
    np.testing.assert_array_equal(tight.search(q, k=3)[1], knn_stacked(q, dupes, k=3)[1])
    assert (tight.certified_, tight.second_round_, tight.fallback_) == (0, 0, 5)


def test_hdbscan_state_is_stored_as_arrays_and_predicts_the_same(tmp_path):
    import pickle

    from sklearn.datasets import make_blobs

    from vitad_ray.normality.hdbscan_predict import (export_model, load_state,
                                                     membership_from_neighbors, save_state)

    x, _ = make_blobs(400, n_features=16, centers=3, cluster_std=1.5, random_state=4)
    x = x.astype(np.float32)
    fitted = HDBSCANNormality().fit(x)
    path = tmp_path / "patch-000.npz"
    save_state(export_model(fitted.model_), path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays: nothing to unpickle
        assert {"raw_tree", "cluster_tree", "core_distances", "cluster_map"} <= set(z.files)
    state = load_state(path)
    assert state.n_clusters == fitted.n_clusters_ == 3
    q = x[:40] + np.random.default_rng(1).normal(0, 1.0, (40, 16)).astype(np.float32)
    k = 2 * state.min_samples
    dist, idx = knn_stacked(q[None], x[None], k=k)
    np.testing.assert_allclose(1 - membership_from_neighbors(state, idx[0], dist[0]),
                               fitted.score_samples(q), atol=1e-9)
    # A pickle put where the state belongs is refused, not run.
    path.write_bytes(pickle.dumps({"not": "arrays"}))
    with pytest.raises(ValueError):
        load_state(path)


@pytest.mark.parametrize("make", [
    lambda: KMeansNormality(k_min=2, k_max=4, m=3),
    lambda: HDBSCANNormality(min_cluster_size=5, min_samples=3),
    lambda: CrossClipNormality(m=2, coreset=0.5, coreset_dim=8),
])
def test_estimators_are_scikit_learn_estimators(make):
    """clone gives an unfitted twin with the same parameters; fit returns the estimator itself
    and adds only attributes ending in an underscore."""
    from sklearn.base import clone

    est = make()
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    before = set(vars(est))
    rng = np.random.default_rng(0)
    if isinstance(est, CrossClipNormality):
        fitted = est.fit(rng.normal(size=(3, 24, 8)).astype(np.float32), np.repeat(np.arange(4), 6))
    else:
        fitted = est.fit(rng.normal(size=(40, 8)).astype(np.float32))
    assert fitted is est
    learned = set(vars(est)) - before
    assert learned and all(a.endswith("_") for a in learned if not a.startswith("_")), learned
    assert not hasattr(clone(est), sorted(a for a in learned if not a.startswith("_"))[0])
