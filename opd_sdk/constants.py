"""Defaults in one place (retry policy, limits, timeouts, loop and objective settings)."""

DEFAULT_MAX_CONCURRENCY = 16
DEFAULT_TIMEOUT_S = 60.0  # per teacher call
DEFAULT_MAX_RETRIES = 5  # attempts after the first
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # cap on a server's requested delay
RETRIABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
CHARS_PER_TOKEN = 4  # rough estimate for token-rate limits before a call
BATCH_DISCOUNT = 0.5  # mode="batch": OpenAI bills Batch API tokens at half the synchronous price
BATCH_POLL_S = (5.0, 300.0)  # mode="batch": first wait between polls of a batch, longest wait (doubling)
DRAIN_TIMEOUT_S = 30.0  # on close, how long calls already sent may take to answer (into the cache)
DEFAULT_TIS_CAP = 2.0  # truncated importance sampling cap when the engine's log-probs are not the trainer's
DEFAULT_CHUNK_ROWS = 4  # rows per LM-head chunk in an objective's forward pass (bounds the [rows, T, V] logits)
