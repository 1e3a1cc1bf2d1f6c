"""The baselines of `cible-bench --suite models`: scikit-learn (KMeans, DBSCAN,
LogisticRegression) and LightGBM on the very rows cible trained on, written by the bench as raw
little-endian arrays. Prints one JSON object: each baseline's training time and quality, and the
quality of cible's own results measured by the same scikit-learn functions.

Usage: python3 bench_models.py DIR  (DIR holds the files and spec.json)
"""

import json
import os
import sys
import time

import numpy as np

directory = sys.argv[1]
spec = json.load(open(os.path.join(directory, "spec.json")))


def matrix(name, columns):
    return np.fromfile(os.path.join(directory, name), dtype="<f8").reshape(-1, columns)


def vector(name, dtype):
    return np.fromfile(os.path.join(directory, name), dtype=dtype)


from lightgbm import LGBMClassifier  # noqa: E402
from sklearn.cluster import DBSCAN, KMeans  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import adjusted_rand_score, roc_auc_score, silhouette_score  # noqa: E402

out = {"threads": os.cpu_count()}

# k-means: same k, restarts and iteration cap; inertia over every row, silhouette on one sample
# for both labelings.
x = matrix("cluster_x.f64", spec["features"])
ours = vector("kmeans_labels.u32", "<u4").astype(np.int64)
sample = vector("silhouette_sample.u32", "<u4").astype(np.int64)
started = time.perf_counter()
km = KMeans(
    n_clusters=spec["k"],
    init="k-means++",
    n_init=spec["restarts"],
    max_iter=300,
    algorithm="lloyd",
    random_state=spec["seed"],
).fit(x)
seconds = time.perf_counter() - started
ours_centroids = np.stack([x[ours == c].mean(axis=0) for c in range(spec["k"])])
out["kmeans"] = {
    "seconds": seconds,
    "inertia": float(km.inertia_),
    "silhouette": float(silhouette_score(x[sample], km.labels_[sample])),
    "ours_inertia": float(((x - ours_centroids[ours]) ** 2).sum()),
    "ours_silhouette": float(silhouette_score(x[sample], ours[sample])),
}

# DBSCAN on the same sample with the same eps and min_points.
d = matrix("dbscan_x.f64", spec["features"])
ours = vector("dbscan_labels.i32", "<i4")
started = time.perf_counter()
db = DBSCAN(eps=spec["eps"], min_samples=spec["min_points"], algorithm="auto").fit(d)
seconds = time.perf_counter() - started
labels = db.labels_
out["dbscan"] = {
    "seconds": seconds,
    "clusters": int(labels.max() + 1),
    "noise": int((labels < 0).sum()),
    "agreement_ari": float(adjusted_rand_score(labels, ours)),
    "same_noise": int(((labels < 0) == (ours < 0)).sum()),
}

# Propensity: the same time split, training and held-out rows.
train_x = matrix("train_x.f64", spec["features_propensity"])
train_y = vector("train_y.u8", "u1")
test_x = matrix("test_x.f64", spec["features_propensity"])
test_y = vector("test_y.u8", "u1")
started = time.perf_counter()
lr = LogisticRegression(C=1.0, max_iter=1000).fit(train_x, train_y)
seconds = time.perf_counter() - started
out["logistic"] = {
    "seconds": seconds,
    "auc": float(roc_auc_score(test_y, lr.predict_proba(test_x)[:, 1])),
}
started = time.perf_counter()
gbm = LGBMClassifier(
    n_estimators=100,
    learning_rate=0.1,
    num_leaves=31,
    min_child_samples=20,
    max_bin=255,
    verbose=-1,
).fit(train_x, train_y)
seconds = time.perf_counter() - started
# Scoring as many rows as there are profiles: the clustering rows (the same features, as of
# now), or training rows repeated should the category columns differ.
rows = x if x.shape[1] == train_x.shape[1] else np.resize(train_x, (x.shape[0], train_x.shape[1]))
started = time.perf_counter()
gbm.predict_proba(rows)
predict_seconds = time.perf_counter() - started
out["lightgbm"] = {
    "seconds": seconds,
    "auc": float(roc_auc_score(test_y, gbm.predict_proba(test_x)[:, 1])),
    "predict_seconds": predict_seconds,
}
ours_scores = {}
for name in ("logistic", "boosted"):
    predicted = vector(f"{name}_test.f64", "<f8")
    ours_scores[name] = float(roc_auc_score(test_y, predicted))
out["ours_auc"] = ours_scores
print(json.dumps(out))
