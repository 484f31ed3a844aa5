"""A rollout batch's teacher requests: one `FeedbackRequest` per prompt group."""

from __future__ import annotations

from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.types import FeedbackRequest


def build_requests(batch: RolloutBatch, tokenizer_id: str | None = None) -> list[FeedbackRequest]:
    """One FeedbackRequest per prompt group: the prompt (text and the token ids it was sampled
    from), its G completions, privileged context.

    metadata = the prompt's metadata plus {"answer": ...} when the prompt has
    a reference answer (a verifier reads it there). tokenizer_id: the
    student tokenizer's fingerprint (a teacher with the same one uses the ids as they are).
    """
    requests = []
    G, L = batch.group_size, batch.prompt_len
    for p, item in enumerate(batch.prompts):
        metadata = dict(item.metadata)
        if item.answer is not None:
            metadata["answer"] = item.answer
        row = p * G
        prompt_ids = batch.input_ids_BT[row, :L][batch.attention_mask_BT[row, :L] > 0].tolist()
        requests.append(
            FeedbackRequest(
                prompt=item.prompt,
                completions=batch.completions_of(p),
                privileged=item.privileged,
                metadata=metadata,
                prompt_token_ids=prompt_ids,
                tokenizer=tokenizer_id,
            )
        )
    return requests
