"""Where a sweep's records live: the MLflow store (its URI and the run layout) and S3."""
