"""A small synchronous client for the parts of a vLLM OpenAI-compatible server
that rollouts need: sampling with token ids and sampler log-probs, the
tokenizer check, and the weight-update routes.

Routes used (all in vLLM 0.32.0, verified on CPU; see README):
- GET  /v1/models, GET /version
- POST /tokenize                     the server's tokenizer (mismatch check)
- POST /v1/completions               prompt as token ids, `n`, `logprobs: 0`,
                                     `return_token_ids: true`
- POST /v1/load_lora_adapter, /v1/unload_lora_adapter
                                     needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=1
                                     and --enable-lora on the server
- POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path"}},
  POST /reset_prefix_cache           need VLLM_SERVER_DEV_MODE=1 on the server

Errors: `ConfigError` naming `rollout.base_url` when the server is down or
lacks a route (raised before training starts); `OPDError` when a call fails
mid-training.
"""

from __future__ import annotations

from typing import Any

import httpx

from opd_sdk.errors import ConfigError, OPDError


class VLLMServerClient:
    """base_url: the OpenAI base URL ("http://host:port/v1"). served_model:
    the name to sample from (None: the first the server lists).

    Raises ConfigError when nothing answers at base_url or it is not vLLM.
    """

    def __init__(self, base_url: str, *, served_model: str | None = None, timeout_s: float = 600.0,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers)
        try:
            models = self.http.get(f"{self.base_url}/models")
            models.raise_for_status()
        except httpx.HTTPError as exc:
            raise ConfigError(
                f"rollout.base_url: no vLLM server answers at {self.base_url} ({type(exc).__name__}: {exc}); "
                "start one (README: Fast rollouts on vLLM) or fix the URL"
            ) from None
        names = [m["id"] for m in models.json().get("data", [])]
        if not names:
            raise ConfigError(f"rollout.base_url: the server at {self.base_url} serves no model")
        if served_model is not None and served_model not in names:
            raise ConfigError(f"rollout.served_model: {served_model!r} is not served at {self.base_url}; it serves {names}")
        self.model = served_model or names[0]
        try:
            version = self.http.get(f"{self.root}/version")
            version.raise_for_status()
            self.version = str(version.json()["version"])
        except (httpx.HTTPError, KeyError, ValueError):
            raise ConfigError(
                f"rollout.base_url: {self.base_url} answers /models but has no vLLM /version route; "
                "rollouts need a vLLM server (token ids and sampler log-probs)"
            ) from None

    def _post(self, path: str, body: dict[str, Any], *, root: bool = False) -> httpx.Response:
        url = f"{self.root if root else self.base_url}{path}"
        try:
            return self.http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise OPDError(f"vLLM server {url}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _check(resp: httpx.Response, what: str, hint: str = "") -> Any:
        if resp.status_code != 200:
            raise OPDError(f"vLLM server: {what} failed with HTTP {resp.status_code}: {resp.text[:500]}{hint}")
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:  # some routes answer plain text ("Success: ...")
            return resp.text

    def tokenize(self, text: str) -> list[int]:
        """The server tokenizer's ids for `text`, no special tokens added."""
        resp = self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}, root=True)
        return list(self._check(resp, "/tokenize")["tokens"])

    def complete(self, prompt_ids: list[list[int]], n: int, *, model: str, max_tokens: int, temperature: float,
                 top_p: float, top_k: int, stop_token_ids: list[int], seed: int | None = None,
                 ) -> list[list[tuple[list[int], list[float]]]]:
        """n samples per prompt: [prompt][sample] -> (token ids, log-prob of each sampled token).

        The log-probs are what the server's `--logprobs-mode` makes them
        (VLLMRollout checks that before training).
        """
        body: dict[str, Any] = {
            "model": model, "prompt": prompt_ids, "n": n, "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "logprobs": 0, "return_token_ids": True,
            "stop_token_ids": stop_token_ids, "skip_special_tokens": False,
        }
        if top_k > 0:
            body["top_k"] = top_k
        if seed is not None:
            body["seed"] = seed
        out = self._check(self._post("/completions", body), "/v1/completions")
        choices = sorted(out["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompt_ids) * n:
            raise OPDError(f"vLLM server returned {len(choices)} choices for {len(prompt_ids)} prompts x n={n}")
        result: list[list[tuple[list[int], list[float]]]] = []
        for p in range(len(prompt_ids)):
            group = []
            for c in choices[p * n : (p + 1) * n]:
                ids = c.get("token_ids")
                lps = (c.get("logprobs") or {}).get("token_logprobs")
                if ids is None or lps is None or len(ids) != len(lps):
                    raise OPDError(
                        "vLLM server: a choice came without token_ids or per-token logprobs "
                        "(needs a vLLM with `return_token_ids`, 0.10.2 or newer)"
                    )
                group.append((list(ids), [float(x) for x in lps]))
            result.append(group)
        return result

    def prompt_logprobs(self, token_ids: list[int], *, model: str) -> list[float]:
        """log p(ids[t] | ids[:t]) at temperature 1 for each t (0.0 at t = 0), from `prompt_logprobs`."""
        body = {"model": model, "prompt": token_ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0}
        out = self._check(self._post("/completions", body), "/v1/completions (prompt_logprobs)")
        entries = out["choices"][0]["prompt_logprobs"]
        return [0.0] + [float(entries[t][str(tok)]["logprob"]) for t, tok in enumerate(token_ids) if t > 0]

    def load_lora(self, name: str, path: str) -> None:
        """Load the adapter saved at `path` (a folder the server can read) under `name`."""
        resp = self._post("/load_lora_adapter", {"lora_name": name, "lora_path": path})
        self._check(resp, "/v1/load_lora_adapter",
                    " (the server needs --enable-lora, a --max-lora-rank >= the adapter's rank, "
                    "and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 in its environment)")

    def unload_lora(self, name: str) -> None:
        self._check(self._post("/unload_lora_adapter", {"lora_name": name}), "/v1/unload_lora_adapter")

    def reload_weights(self, path: str) -> None:
        """Every weight from the safetensors files in `path`, loaded in place (vLLM's
        `reload_weights` worker RPC), then the prefix cache dropped (it holds KV of the old weights)."""
        hint = " (start the server with VLLM_SERVER_DEV_MODE=1 for /collective_rpc and /reset_prefix_cache)"
        resp = self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}}, root=True)
        self._check(resp, "/collective_rpc reload_weights", hint)
        self._check(self._post("/reset_prefix_cache", {}, root=True), "/reset_prefix_cache", hint)

    def has_route(self, path: str) -> bool:
        """Whether POST `path` (under the server root) exists: 404/405 mean it does not."""
        try:
            resp = self.http.post(f"{self.root}{path}", json={})
        except httpx.HTTPError:
            return False
        return resp.status_code not in (404, 405)

    def close(self) -> None:
        self.http.close()
