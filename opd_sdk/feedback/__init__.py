"""Feedback: teachers grade the student's completions.

Owns the `Teacher` protocol (and the optional members a teacher may offer), the
requests built from a rollout batch, `FeedbackCollector` (cache, in-flight dedup,
concurrency, RPM/TPM limits, retries, budget, usage) and `LocalRunner` (teachers that
run in this process), the `Collector` protocol both implement and the one factory
`make_collector` (`factory.py`) that picks between them, the OpenAI Batch API mode
(`batch.py`), and the checks on a teacher's
answers. Everything that touches the network is async here.
May import: the shared vocabulary and `rollout` (the batch a request is built from);
never `train/`, `objectives/` or `config/`.
"""
