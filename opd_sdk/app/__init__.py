"""App: what a user runs, `opd train` / `opd eval` / `opd demo`, and the TRL bridge.

`cli` is a thin shell over `runner` (config -> loaded student, teacher, collector, trainer,
evaluation, summary); `demo` is the offline default job; `trl` wraps a teacher as a TRL
reward function. May import anything; nothing imports it.
"""
