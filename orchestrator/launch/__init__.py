"""One launch of a sweep: preflight checks, the launch's record on storage, its MLflow parent
run, the Tuner, and the repair of Tune's saved state before a resume (run.py ties them together)."""
