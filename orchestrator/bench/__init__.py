"""Benchmarks: `python -m orchestrator.bench {trainer,data,overhead,...} [--json]`.

trainer   images/s of our Trainer against a plain timm + AdamW fp32 loop on the same prebuilt
          batches, MFU on a GPU, and optionally K concurrent copies on one GPU (packing small models).
data      images/s of the input pipeline alone beside images/s the trainer consumes (input-bound?).
overhead  wall time of N short trainings through `orchestrator.sweep` (Ray Tune + MLflow)
          against the same trainings in a bare process pool, with a breakdown of the difference.

Figures and how they were measured: docs/performance.md.
"""
