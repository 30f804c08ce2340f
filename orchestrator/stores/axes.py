"""The axis tags of a trial run: one tag per swept key, and the four study axes on every run.

The study axes keep short names (`axis.model_size`, `axis.num_registers`, `axis.steps`,
`axis.seed`, `axis.objective`) whether they were swept or not; any other swept key is tagged by its config path
(`axis.optim.lr`). Apart from orchestrator/stores/mlflow_runs.py because trial workers use it
and must not import MLflow.
"""

from __future__ import annotations

AXIS_PREFIX = "axis."
AXIS_SIZE = "axis.model_size"
AXIS_REGISTERS = "axis.num_registers"
AXIS_STEPS = "axis.steps"
AXIS_SEED = "axis.seed"
AXIS_OBJECTIVE = "axis.objective"  # supervised | dino | clip
# Config path -> the study axis's tag.
STUDY_AXES = {
    "model.size": AXIS_SIZE,
    "model.num_registers": AXIS_REGISTERS,
    "steps": AXIS_STEPS,
    "seed": AXIS_SEED,
    "objective": AXIS_OBJECTIVE,
}
# The block before which the registers enter (trainers/late_registers.py). Tagged by its path,
# as any further swept key, and only where it is swept; the analysis still reads it as a register
# axis beside the count (never pooled with the seeds), from the tag, else the run's config params.
REGISTER_DEPTH_PATH = "model.register_depth"
AXIS_REGISTER_DEPTH = AXIS_PREFIX + REGISTER_DEPTH_PATH
# Runs written before one tag per axis also carry these path-named copies of two study axes.
LEGACY_DUPLICATES = ("axis.model.size", "axis.model.num_registers")


def axis_tag(path: str) -> str:
    """The tag of a swept config path: 'model.num_registers' -> 'axis.num_registers', 'optim.lr' -> 'axis.optim.lr'."""
    return STUDY_AXES.get(path, AXIS_PREFIX + path)
