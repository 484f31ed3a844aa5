"""A local Hugging Face model behind the scripted OpenAI-compatible server: a tiny black-box teacher.

`ModelResponder(model, tokenizer)` is a `ScriptedServer` responder that answers
as vLLM does, from a real (tiny) model:

- POST /v1/chat/completions: `n` samples of the chat-rendered prompt at the
  request's temperature (greedy at 0), at most `max_tokens` new tokens, with
  the token counts in `usage`.
- POST /v1/completions with `echo`: the log-probability of every prompt token
  (`logprobs.token_logprobs`, first None), their text offsets, and when
  `prompt_logprobs=k` is asked, vLLM's per-position dicts {token id: {logprob,
  rank, decoded_token}} holding the top-k and the actual token. The prompt may
  be token ids (vLLM's `send="token_ids"` path) or text. One greedy token
  follows, as with max_tokens=1.

It serves tests and the `--tiny` tier of benchmarks/blackbox.py, where the
student loop must reach its teacher over HTTP exactly as it reaches vLLM.
"""

from __future__ import annotations

import threading

import torch


class ModelResponder:
    """Answers chat and echo-completion requests from `model` (see the module docstring)."""

    def __init__(self, model, tokenizer, *, seed: int = 0) -> None:
        self.model, self.tok = model.eval(), tokenizer
        self.generator = torch.Generator().manual_seed(seed)
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> dict:
        with self.lock, torch.no_grad():
            return self.chat(body) if "messages" in body else self.echo(body)

    def chat(self, body: dict) -> dict:
        text = self.tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        n, temperature = int(body.get("n") or 1), float(body.get("temperature", 1.0))
        eos = self.tok.eos_token_id
        choices, produced = [], 0
        for index in range(n):
            seq = list(ids)
            for _ in range(int(body.get("max_tokens") or 16)):
                logits = self.model(torch.tensor([seq])).logits[0, -1]
                if temperature == 0:
                    nxt = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / temperature, -1)
                    nxt = int(torch.multinomial(probs, 1, generator=self.generator))
                seq.append(nxt)
                if nxt == eos:
                    break
            new = seq[len(ids):]
            produced += len(new)
            content = self.tok.decode([t for t in new if t != eos], skip_special_tokens=False)
            choices.append({"index": index, "finish_reason": "stop" if new[-1] == eos else "length",
                            "logprobs": None, "message": {"role": "assistant", "content": content or "."}})
        return {"id": "chatcmpl-model", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": produced,
                          "total_tokens": len(ids) + produced}}

    def echo(self, body: dict) -> dict:
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else self.tok(prompt, add_special_tokens=False)["input_ids"]
        logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)  # [T, V]
        pieces = [self.tok.decode([i], skip_special_tokens=False) for i in ids]
        offsets = [sum(len(p) for p in pieces[:k]) for k in range(len(ids))]
        token_lps = [None] + [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]
        k = body.get("prompt_logprobs")
        prompt_lps = None
        if k is not None:
            prompt_lps = [None]
            for t in range(1, len(ids)):
                row = logprobs[t - 1]
                order = torch.argsort(row, descending=True)
                rank = {int(i): r + 1 for r, i in enumerate(order[: max(int(k), 1)].tolist())}
                keep = list(order[: int(k)].tolist()) + [ids[t]]
                prompt_lps.append({str(i): {"logprob": float(row[i]), "decoded_token": self.tok.decode([i]),
                                            "rank": rank.get(int(i), int((row > row[i]).sum()) + 1)}
                                   for i in keep})
        nxt = int(logprobs[-1].argmax())
        tail = self.tok.decode([nxt], skip_special_tokens=False)
        choice = {"index": 0, "text": "".join(pieces) + tail, "finish_reason": "length",
                  "logprobs": {"tokens": pieces + [tail], "text_offset": offsets + [sum(map(len, pieces))],
                               "token_logprobs": token_lps + [float(logprobs[-1, nxt])], "top_logprobs": None}}
        if prompt_lps is not None:
            choice["prompt_logprobs"] = prompt_lps
        return {"id": "cmpl-model", "object": "text_completion", "created": 0, "model": body.get("model"),
                "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}
