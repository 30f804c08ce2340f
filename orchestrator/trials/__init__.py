"""What runs inside Tune: the trainable that adapts Tune's config to trainers/, the records a trial
hands to the driver, the driver's MLflow logger, checkpoint pruning and the grid-cell searcher.
Keep this file empty: trial workers import orchestrator.trials.trainable and nothing more."""
