"""Per-scope normality estimators (scikit-learn style) and cross-clip calibration."""

# The paper recipe's estimators, by the name a scores column, a threshold and a request use.
METHODS = ("kmeans", "hdbscan")
# How the cross-clip detector puts a distance on the scale of unseen normal clips.
CALIBRATIONS = ("raw", "ratio", "zscore", "ecdf")
