"""Watching artifacts emerge while a trial trains (docs/probes.md, "Emergence").

`monitor` is the pure decision logic (no torch): which probe outcomes make an emergence event,
when to probe more often, what to keep. `keys` names what a trial reports and tags. `measure`,
`snapshots` and `watch` are the torch side the trainer calls. Importing this package imports
none of them, so the orchestrator's driver reads `keys` and `monitor` without torch.
"""
