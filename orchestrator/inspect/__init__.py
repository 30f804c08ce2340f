"""Artifact probes on pretrained ViTs, side by side: `python -m orchestrator.inspect MODEL [MODEL ...]`.

    sources.py   MODEL on the command line -> a local weights file (hub cache/download, file, trial run)
    probe.py     one model probed as it is and, optionally, with a test-time register
    runs.py      the MLflow run of one model variant (tags, params, metrics, files)
    store.py     the MLflow side: trial checkpoints, the inspection experiment
    report.py    report.md and tables; figures.py the side-by-side figures
"""
