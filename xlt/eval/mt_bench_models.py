"""Models that answer or judge MT-Bench: a local transformers model in its own chat format, or an
OpenAI-compatible chat-completions endpoint (a vLLM server, a hosted API).

Both offer ``complete(messages, temperature, max_new_tokens) -> str`` over ``[{"role", "content"}, ...]``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

from xlt.config import XltError

SFT_INFO_FILE = "xlt_sft.json"  # written by xlt sft next to the model (xlt.train.sft.SFT_INFO_FILE)
_RETRYABLE_HTTP = (408, 409, 429, 500, 502, 503, 504)


def model_name(spec: str) -> str:
    """A short name for a model spec: the folder name (``run-sft`` for an xlt run's ``RUN/sft``) or hub id."""
    path = os.path.normpath(os.path.expanduser(spec))
    if not os.path.isdir(path):
        return spec.replace("/", "--")
    base = os.path.basename(path)
    if base in ("sft", "cpt", "base"):
        return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}-{base}"
    return base


def model_format(path: str, tokenizer: Any) -> tuple[str, list[int]]:
    """``(prompt_format, stop ids)`` the model was trained with.

    An xlt SFT model: ``xlt_sft.json``'s format and stop ids. Otherwise the tokenizer's chat template
    (``chat``, stopping at its end-of-turn token), and without one xlt's default SFT format
    ``stablelm_alpaca`` (stopping at EOS): a base model has no format of its own.
    """
    from xlt.data import sft_format

    info_path = os.path.join(path, SFT_INFO_FILE)
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        fmt = info.get("prompt_format")
        sft_format.check_prompt_format(fmt)
        stops = [int(t) for t in info.get("stop_token_ids") or []]
        return fmt, stops or sft_format.stop_token_ids(fmt, tokenizer)
    fmt = "chat" if getattr(tokenizer, "chat_template", None) else "stablelm_alpaca"
    return fmt, sft_format.stop_token_ids(fmt, tokenizer)


class LocalChat:
    """A transformers causal LM answering in its own format; greedy at temperature 0, else sampled.

    The weights load at the first prompt: a resumed run with nothing left to answer or judge loads nothing.
    """

    deterministic = True  # greedy decoding gives the same verdict again: retrying an unparsed one is pointless

    def __init__(self, spec: str, trust_remote_code: bool = False) -> None:
        self.spec, self.trust_remote_code, self.name = spec, trust_remote_code, model_name(spec)
        self.model: Any = None
        self._warned = False

    def _load_format(self) -> None:
        """The tokenizer and the prompt format with its stop ids."""
        from xlt.models import load_tokenizer, resolve_model

        self.tokenizer = load_tokenizer(self.spec, trust_remote_code=self.trust_remote_code)
        self.prompt_format, self.stop_ids = model_format(resolve_model(self.spec), self.tokenizer)

    def _load(self) -> None:
        """Tokenizer, format and weights (on the GPU when there is one, as ``xlt evaluate speed``)."""
        import torch

        from xlt.models import load_model

        if self.model is None:
            self._load_format()
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = load_model(self.spec, trust_remote_code=self.trust_remote_code).to(device).eval()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt as in training; a template that rejects a system turn gets it merged into the user turn."""
        from xlt.data.sft_format import generation_prompt_ids

        self._load()
        try:
            return generation_prompt_ids(messages, self.prompt_format, self.tokenizer)
        except XltError:
            if messages[0]["role"] != "system" or len(messages) < 2:
                raise
            merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            return generation_prompt_ids([merged, *messages[2:]], self.prompt_format, self.tokenizer)

    def new_conversation(self) -> None:
        """FastChat seeds the sampler with the choice index (0) once per question, before its first turn."""
        import torch

        torch.manual_seed(0)

    def _warn_context(self, tokens: int) -> None:
        """Once: a prompt plus answer longer than the model's context (its verdicts will be poor)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and tokens > limit and not self._warned:
            self._warned = True
            print(f"[mt-bench] warning: {self.name}: prompt + max new tokens = {tokens} tokens exceeds its "
                  f"context of {limit} (a judge prompt holds the question, the answers and the reference)",
                  file=sys.stderr, flush=True)

    def complete(self, messages: list[dict], temperature: float, max_new_tokens: int) -> str:
        import torch

        ids = self.prompt_ids(messages)
        self._warn_context(len(ids) + max_new_tokens)
        sample = {"do_sample": True, "temperature": temperature} if temperature >= 1e-4 else {"do_sample": False}
        inp = torch.tensor([ids], device=self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        with torch.no_grad():
            out = self.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                                      eos_token_id=self.stop_ids, pad_token_id=pad, **sample)
        return self.decode(out[0, len(ids):].tolist())

    def decode(self, new: list[int]) -> str:
        """The answer: the new tokens up to the first stop token, special tokens dropped, stripped."""
        cut = next((i for i, t in enumerate(new) if t in self.stop_ids), len(new))
        return self.tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


def vllm_available() -> bool:
    """Whether ``import vllm`` works (it is installed only on GPU machines)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(name: str) -> str:
    """``transformers`` or ``vllm``: ``auto`` is vLLM when it imports and a CUDA GPU is there."""
    if name not in ("auto", "transformers", "vllm"):
        raise XltError(f"mt-bench: --backend {name!r}: expected auto, transformers or vllm")
    if name == "vllm" and not vllm_available():
        raise XltError("mt-bench: --backend vllm: vLLM is not installed (pip install vllm, on a GPU machine); "
                       "--backend transformers answers without it")
    if name == "auto":
        import torch

        return "vllm" if torch.cuda.is_available() and vllm_available() else "transformers"
    return name


class VllmChat(LocalChat):
    """The answering model on vLLM's offline engine (``vllm.LLM``), in the same format as :class:`LocalChat`:
    the prompt token ids are built here (the SFT format the model was trained with, not vLLM's chat template)
    and sent as a ``TokensPrompt``; generation stops at the model's stop ids; greedy at temperature 0, else
    sampled with a fixed seed. The answer is decoded here too, so both backends cut and strip alike."""

    def _load(self) -> None:
        from vllm import LLM

        from xlt.models import resolve_model

        if self.model is None:
            self._load_format()
            path = resolve_model(self.spec)
            self.model = LLM(model=path, tokenizer=path, trust_remote_code=self.trust_remote_code, seed=0)

    def complete(self, messages: list[dict], temperature: float, max_new_tokens: int) -> str:
        from vllm import SamplingParams

        ids = self.prompt_ids(messages)
        params = SamplingParams(n=1, temperature=temperature if temperature >= 1e-4 else 0.0,
                                max_tokens=max_new_tokens, stop_token_ids=list(self.stop_ids), seed=0)
        out = self.model.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        return self.decode(list(out[0].outputs[0].token_ids))


def answering_chat(spec: str, backend: str, trust_remote_code: bool = False) -> LocalChat:
    """The model that answers, on ``backend`` (already picked by :func:`pick_backend`)."""
    cls = VllmChat if backend == "vllm" else LocalChat
    return cls(spec, trust_remote_code=trust_remote_code)


def chat_completions_url(url: str) -> str:
    """``.../v1`` (or a server root) -> ``.../v1/chat/completions``; a full endpoint URL is kept."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + "/chat/completions" if url.endswith("/v1") else url + "/v1/chat/completions"


class EndpointChat:
    """An OpenAI-compatible ``/chat/completions`` endpoint (standard library only).

    The API key is read from the environment variable ``api_key_env`` and sent as a bearer token; it is
    never printed. Transport errors and HTTP 408/409/429/5xx are retried ``api_retries`` times; any other
    HTTP error, or a reply without ``choices[0].message``, is one line.
    """

    deterministic = False  # a hosted judge at temperature 0 is not guaranteed to repeat itself

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 600,
                 api_retries: int = 3, retry_sleep: float = 5.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise XltError(f"--judge-url {url!r}: expected http(s)://HOST[:PORT]/v1")
        self.name, self.model, self.url = model, model, chat_completions_url(url)
        self.key = os.environ.get(api_key_env) or None
        self.timeout, self.api_retries, self.retry_sleep = timeout, api_retries, retry_sleep
        self._host, self._port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)

    def _first_hop(self) -> tuple[str, int]:
        """The host urllib connects to: the endpoint, or the proxy of its scheme (``HTTPS_PROXY`` ...)."""
        scheme = urllib.parse.urlsplit(self.url).scheme
        proxy = urllib.request.getproxies().get(scheme)
        if proxy and not urllib.request.proxy_bypass(self._host):
            p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            if p.hostname:
                return p.hostname, p.port or 80
        return self._host, self._port

    def new_conversation(self) -> None:
        """Nothing to reset: the endpoint samples on its side."""

    def check_reachable(self) -> None:
        """Before any work: a TCP connection to the endpoint's host (or its proxy) opens, else one line."""
        try:
            socket.create_connection(self._first_hop(), timeout=min(self.timeout, 10)).close()
        except OSError as e:
            raise XltError(f"judge: cannot reach {self.url} ({e.strerror or e})") from None

    def _request(self, messages: list[dict], temperature: float, max_new_tokens: int) -> urllib.request.Request:
        body = {"model": self.model, "messages": messages, "n": 1, "temperature": temperature,
                "max_tokens": max_new_tokens}
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers)

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise XltError(f"judge: {self.url} replied without choices[0].message (not an OpenAI-compatible "
                           "chat completions endpoint?)") from None
        return content if isinstance(content, str) else ""

    def complete(self, messages: list[dict], temperature: float, max_new_tokens: int) -> str:
        last: Optional[str] = None
        for attempt in range(self.api_retries + 1):
            if attempt:
                time.sleep(self.retry_sleep)
            try:
                with urllib.request.urlopen(self._request(messages, temperature, max_new_tokens),
                                            timeout=self.timeout) as r:
                    return self._content(r.read())
            except urllib.error.HTTPError as e:
                detail = e.read(300).decode("utf-8", "replace").replace("\n", " ").strip()
                last = f"HTTP {e.code} {detail}".strip()
                if e.code not in _RETRYABLE_HTTP:
                    raise XltError(f"judge: {self.url} answered {last}") from None
            except (urllib.error.URLError, OSError) as e:
                last = str(getattr(e, "reason", None) or e)
        raise XltError(f"judge: {self.url} failed {self.api_retries + 1} times (last: {last})")
