"""Test-only interpreter hook: plants a register neuron into trainers.loop.Trainer of a sweep's
workers (tests/planted_training.py). Python imports `sitecustomize` at start-up from sys.path, so
it acts only in processes whose PYTHONPATH names this folder (tests/test_emergence_sweep.py sets
it for the sweep it starts; Ray's workers inherit it) and only when REGISTER_TESTS_PLANT_AT_STEP
is set. It imports nothing heavy: Trainer is patched the moment a worker imports trainers.loop.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

PLANT_ENV = "REGISTER_TESTS_PLANT_AT_STEP"
TARGET = "trainers.loop"


class _PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once; the normal finders locate the module
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            from planted_training import patch_trainer_class  # tests/ is on PYTHONPATH beside this folder

            patch_trainer_class(module.Trainer)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get(PLANT_ENV):
    sys.meta_path.insert(0, _PatchTrainerOnImport())
