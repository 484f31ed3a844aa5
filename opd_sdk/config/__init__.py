"""Config: what a run is made of, declared once and checked before any model loads.

Owns the loop settings (`settings`), the YAML run config (`run`), the teacher
declarations (`teachers`), the registry that builds teachers and objectives from their
`type`, the checks that need no weights, and reading the run's prompts (`data`).
May import: every layer below the loop (rollout, feedback, providers, objectives,
parallel); never `train/` or `app/`.
"""
