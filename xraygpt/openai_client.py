"""One OpenAI-compatible chat client for everything that calls an LLM API (data-prep cleaning, the GPT judge).

Why a wrapper around `openai.OpenAI` at all: at 200k requests a run meets rate limits, 5xx, hung sockets and
pre-emption. This module adds what a long run needs, and nothing else:

* any OpenAI-compatible endpoint (`base_url`: OpenAI, vLLM, llama.cpp server) or Azure OpenAI (`AzureOpenAI`
  with `api_version` + deployment); the key comes from an environment variable whose *name* is configured;
* bounded concurrency (a thread pool with a sliding window, so 200k jobs never sit in memory as futures);
* retries with exponential backoff and jitter on 429 (honouring Retry-After, for every worker), 408/409, 5xx,
  timeouts, dropped connections and malformed bodies; a bounded number of attempts; 4xx errors fail at once;
* a validation hook per response (empty content always fails); failures are results with a reason, not crashes;
* an on-disk cache keyed by sha256 of the request payload (model, messages, sampling, prompt version):
  a rerun costs no calls;
* an append-only JSONL journal, fsync'd per record, so a killed run resumes and redoes nothing already done;
* token usage and a cost estimate.

    client = ChatClient(cfg, prompt_version="clean_report_v1:3f2a...", journal_path=out / "progress.jsonl")
    for result in client.run(jobs, validate=my_check):  # any order
        ...
    print(client.stats.summary(cfg))
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

log = logging.getLogger("xraygpt.openai")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOCAL_HOSTS = {"localhost", "localhost.localdomain"}


class ChatConfigError(ValueError):
    """The endpoint configuration cannot work (missing key variable, Azure fields, bad values)."""


@dataclass
class ChatEndpointConfig:
    """Where and how to call an OpenAI-compatible chat model. Nested in data-prep and judge configs."""

    provider: Literal["openai", "azure"] = "openai"
    # OpenAI-compatible root including /v1 (vLLM: http://127.0.0.1:8000/v1). null = https://api.openai.com/v1
    base_url: str | None = None
    azure_endpoint: str | None = None  # https://<resource>.openai.azure.com (provider: azure)
    azure_deployment: str | None = None  # the deployment name; requests go to /openai/deployments/<it>/...
    api_version: str | None = None  # Azure api-version, e.g. 2024-06-01
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the environment variable holding the key, never the key
    model: str = "gpt-3.5-turbo"
    temperature: float = 0.0
    max_tokens: int | None = 512  # null: not sent
    seed: int | None = None  # sent when set (best-effort determinism on OpenAI)
    concurrency: int = 16  # requests in flight
    timeout_s: float = 60.0  # per request
    max_attempts: int = 6  # per job, first try included
    backoff_base_s: float = 1.0  # wait before retry n: base * 2**(n-1), jittered, capped by backoff_max_s
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0  # a server's Retry-After is honoured up to this many seconds
    invalid_retries: int = 1  # extra tries when a response fails validation (empty, blanks left, too long)
    cache: bool = True
    cache_dir: str | None = None  # null: <XRAYGPT_CACHE>/openai
    # USD per 1k tokens for the cost estimate (gpt-3.5-turbo-0125 list price; set yours).
    price_prompt_per_1k: float = 0.0005
    price_completion_per_1k: float = 0.0015

    def validate(self) -> None:
        if not _ENV_NAME.match(self.api_key_env):
            # Never echo the value: someone may have pasted the key itself here.
            raise ChatConfigError(
                "api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not a key. "
                "Put the key in that variable: export OPENAI_API_KEY=...")
        if self.provider == "azure":
            missing = [k for k in ("azure_endpoint", "azure_deployment", "api_version") if not getattr(self, k)]
            if missing:
                raise ChatConfigError(f"provider 'azure' needs {', '.join(missing)} (e.g. azure_endpoint="
                                      "https://<resource>.openai.azure.com azure_deployment=<name> "
                                      "api_version=2024-06-01)")
        if self.concurrency < 1 or self.max_attempts < 1 or self.timeout_s <= 0:
            raise ChatConfigError("concurrency and max_attempts must be >= 1 and timeout_s > 0")


def endpoint_url(cfg: ChatEndpointConfig) -> str:
    """The URL requests go to, for messages and the data-use guard."""
    if cfg.provider == "azure":
        return f"{(cfg.azure_endpoint or '').rstrip('/')}/openai/deployments/{cfg.azure_deployment}"
    return cfg.base_url or "https://api.openai.com/v1"


def is_local_endpoint(cfg: ChatEndpointConfig) -> bool:
    """True when requests stay on this machine (loopback address or localhost)."""
    host = (urlparse(endpoint_url(cfg)).hostname or "").lower()
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(cfg: ChatEndpointConfig) -> str:
    """The key from the environment. Local servers (vLLM) usually need none, so a placeholder is fine there."""
    key = os.environ.get(cfg.api_key_env, "")
    if key:
        return key
    if is_local_endpoint(cfg):
        return "no-key-needed-for-local-server"
    raise ChatConfigError(f"environment variable {cfg.api_key_env} is not set; export it with your API key for "
                          f"{endpoint_url(cfg)} (keys are read from the environment only, never from configs)")


# ---- records -------------------------------------------------------------------------------------------------


@dataclass
class ChatJob:
    """One request: `id` is the caller's stable identity (report id, sample id) used for resume."""

    id: str
    messages: list[dict[str, str]]


@dataclass
class ChatResult:
    id: str
    ok: bool
    text: str | None  # the response text (also for validation failures, to inspect)
    reason: str | None  # why it failed; None when ok
    source: Literal["api", "cache", "journal"]
    attempts: int  # HTTP requests made for this job in this run
    key: str  # sha256 of the request payload
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class UsageStats:
    """Counters for one run; updated from worker threads under a lock."""

    requests: int = 0  # HTTP requests sent (retries included)
    retries: int = 0
    api_ok: int = 0
    cache_hits: int = 0
    journal_hits: int = 0
    failed: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def cost_usd(self, cfg: ChatEndpointConfig) -> float:
        return (self.prompt_tokens * cfg.price_prompt_per_1k + self.completion_tokens * cfg.price_completion_per_1k
                ) / 1000.0

    def as_dict(self, cfg: ChatEndpointConfig) -> dict[str, Any]:
        return {"requests": self.requests, "retries": self.retries, "api_ok": self.api_ok,
                "cache_hits": self.cache_hits, "journal_hits": self.journal_hits, "failed": self.failed,
                "failure_reasons": dict(self.failure_reasons), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd_estimate": round(self.cost_usd(cfg), 6)}

    def summary(self, cfg: ChatEndpointConfig) -> str:
        return (f"{self.requests} requests ({self.retries} retries), {self.api_ok} answered, {self.cache_hits} from "
                f"cache, {self.journal_hits} already done (journal), {self.failed} failed; tokens: "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion, estimated cost "
                f"${self.cost_usd(cfg):.4f} at ${cfg.price_prompt_per_1k}/{cfg.price_completion_per_1k} per 1k")


def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters a token) for dry-run cost estimates."""
    return max(1, len(text) // 4)


# ---- cache and journal ---------------------------------------------------------------------------------------


class DiskCache:
    """Validated responses on disk, one small JSON file per request key (sharded by the first two hex digits).

    Best effort by design: written with rename (never half a file) but without fsync; an unreadable entry is a miss.
    The journal, not the cache, is the durable record of a run.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)


class Journal:
    """Append-only JSONL progress file; each record is flushed and fsync'd before the job counts as done.

    A SIGKILL can leave a partial last line: `load` ignores it and cuts it off, so the next append starts clean.
    When an id appears twice (e.g. a failure retried after a prompt change), the last record wins.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = None

    def load(self) -> dict[str, dict]:
        records: dict[str, dict] = {}
        if not self.path.exists():
            return records
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # partial record from a killed writer
            log.warning("%s: dropping an incomplete last record (%d bytes) left by an interrupted run",
                        self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for lineno, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[str(record["id"])] = record
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{self.path}:{lineno}: corrupt journal record; move the file away to start "
                                 "over (the response cache still saves the calls)") from None
        return records

    def append(self, record: dict) -> None:
        self.append_many([record])

    def append_many(self, records: list[dict]) -> None:
        """Append records with one fsync (group commit: durable, and cheap at hundreds of records a second)."""
        line = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open: one per run)
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ---- the client ----------------------------------------------------------------------------------------------

Validator = Callable[[ChatJob, str], "str | None"]  # returns a failure reason, or None when the text is fine


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


def _retry_after_seconds(response: Any) -> float | None:
    """Seconds from `retry-after-ms` / `retry-after` (number or HTTP date), None when absent or unparsable."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:
            pass
        try:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return None


class ChatClient:
    """Runs many chat jobs through one endpoint with retries, cache, journal and usage accounting."""

    def __init__(self, cfg: ChatEndpointConfig, prompt_version: str = "", journal_path: str | Path | None = None,
                 retry_failed: bool = False, rng_seed: int | None = None, client: Any = None):
        cfg.validate()
        import openai  # noqa: F401  (0.6 s: paid when a client is made, not when this module is imported)

        self.cfg = cfg
        self.prompt_version = prompt_version  # part of every cache key: a new prompt never reuses old answers
        self.retry_failed = retry_failed  # resume: also redo jobs the journal records as failed
        self.journal = Journal(journal_path) if journal_path is not None else None
        self.cache: DiskCache | None = None
        if cfg.cache:
            if cfg.cache_dir:
                root = Path(cfg.cache_dir).expanduser()
            else:
                from xraygpt.assets import cache_dir

                root = cache_dir("openai")
            self.cache = DiskCache(root)
        self.stats = UsageStats()
        self._lock = threading.Lock()
        self._pause_until = 0.0  # monotonic time before which no worker sends (set by Retry-After)
        self._rng = random.Random(rng_seed)
        self._client = client  # built lazily, so dry runs need no key

    # ---- requests ----
    def payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """The request body (minus transport details); also what the cache key hashes."""
        body: dict[str, Any] = {"model": self.cfg.azure_deployment if self.cfg.provider == "azure" else self.cfg.model,
                                "messages": messages, "temperature": self.cfg.temperature}
        if self.cfg.max_tokens is not None:
            body["max_tokens"] = self.cfg.max_tokens
        if self.cfg.seed is not None:
            body["seed"] = self.cfg.seed
        return body

    def request_key(self, payload: dict[str, Any]) -> str:
        keyed = {"payload": payload, "model": self.cfg.model, "prompt_version": self.prompt_version}
        return hashlib.sha256(json.dumps(keyed, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _openai(self) -> Any:
        if self._client is None:
            import openai

            key = resolve_api_key(self.cfg)
            common = {"api_key": key, "max_retries": 0, "timeout": self.cfg.timeout_s}  # we retry, not the SDK
            if self.cfg.provider == "azure":
                self._client = openai.AzureOpenAI(azure_endpoint=self.cfg.azure_endpoint,
                                                  azure_deployment=self.cfg.azure_deployment,
                                                  api_version=self.cfg.api_version, **common)
            else:
                self._client = openai.OpenAI(base_url=self.cfg.base_url, **common)
            _ = self._client.chat.completions  # load the resource once here, not in 16 threads at once
        return self._client

    def _backoff(self, attempt: int) -> float:
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        with self._lock:
            return cap * (0.5 + 0.5 * self._rng.random())  # "equal jitter": spread retries, never zero

    def _wait_for_pause(self) -> None:
        while True:
            with self._lock:
                delay = self._pause_until - time.monotonic()
            if delay <= 0:
                return
            time.sleep(delay)

    def _send_once(self, payload: dict[str, Any]) -> tuple[str, dict[str, int]]:
        import openai

        client = self._openai()
        with self._lock:
            self.stats.requests += 1
        try:
            response = client.chat.completions.create(**payload)
        except openai.RateLimitError as e:
            raise _Retry("http_429", _retry_after_seconds(e.response)) from None
        except openai.APITimeoutError:
            raise _Retry("timeout") from None
        except openai.APIConnectionError:
            raise _Retry("connection_error") from None
        except openai.APIStatusError as e:
            if e.status_code in (408, 409) or e.status_code >= 500:
                raise _Retry(f"http_{e.status_code}", _retry_after_seconds(e.response)) from None
            raise _Fatal(f"http_{e.status_code}: {str(e.message)[:200]}") from None
        except (ValueError, openai.APIResponseValidationError):  # body is not the JSON we expect
            raise _Retry("malformed_response") from None
        usage = {}
        if getattr(response, "usage", None) is not None:
            usage = {"prompt_tokens": int(response.usage.prompt_tokens or 0),
                     "completion_tokens": int(response.usage.completion_tokens or 0)}
            with self._lock:
                self.stats.prompt_tokens += usage["prompt_tokens"]
                self.stats.completion_tokens += usage["completion_tokens"]
        try:
            text = response.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise _Retry("malformed_response") from None
        return text, usage

    def _call(self, job: ChatJob, payload: dict[str, Any], key: str, validate: Validator | None) -> ChatResult:
        """Worker: try until valid, out of attempts, or a non-retryable error."""
        attempts, invalid, reason, text, usage = 0, 0, "no attempt", None, {}
        while attempts < self.cfg.max_attempts:
            attempts += 1
            self._wait_for_pause()
            delay = None
            try:
                text, usage = self._send_once(payload)
            except _Fatal as e:
                return ChatResult(job.id, False, None, str(e), "api", attempts, key)
            except _Retry as e:
                reason = e.reason
                if e.retry_after is not None:
                    delay = min(e.retry_after, self.cfg.retry_after_max_s)
                    with self._lock:  # every worker backs off, not just this one
                        self._pause_until = max(self._pause_until, time.monotonic() + delay)
            else:
                problem = "empty response" if not text.strip() else (validate(job, text) if validate else None)
                if problem is None:
                    return ChatResult(job.id, True, text, None, "api", attempts, key, usage)
                reason = f"invalid: {problem}"
                invalid += 1
                if invalid > self.cfg.invalid_retries:
                    return ChatResult(job.id, False, text, reason, "api", attempts, key, usage)
            if attempts < self.cfg.max_attempts:
                with self._lock:
                    self.stats.retries += 1
                log.info("job %s: %s, retry %d/%d", job.id, reason, attempts, self.cfg.max_attempts - 1)
                time.sleep(delay if delay is not None else self._backoff(attempts))
        return ChatResult(job.id, False, text, f"{reason} (after {attempts} attempts)", "api", attempts, key, usage)

    def _commit(self, results: list[ChatResult]) -> Iterator[ChatResult]:
        """Count, cache (ok answers), journal with one fsync for the batch, and only then hand the results out:
        once its journal line is on disk a job is done for good."""
        records = []
        with self._lock:
            for r in results:
                if r.source == "cache":
                    self.stats.cache_hits += 1
                elif r.source == "journal":
                    self.stats.journal_hits += 1
                elif r.ok:
                    self.stats.api_ok += 1
                if not r.ok:
                    self.stats.failed += 1
                    self.stats.failure_reasons[(r.reason or "").split(" (after")[0].split(":")[0]] += 1
        for r in results:
            if r.source == "journal":
                continue
            if r.ok and r.source == "api" and self.cache is not None:
                self.cache.put(r.key, {"text": r.text, "usage": r.usage, "model": self.cfg.model,
                                       "prompt_version": self.prompt_version})
            records.append({"id": r.id, "key": r.key, "ok": r.ok, "text": r.text, "reason": r.reason,
                            "source": r.source, "attempts": r.attempts, "usage": r.usage})
        if self.journal is not None and records:
            self.journal.append_many(records)
        yield from results

    def _already_answered(self, job: ChatJob, key: str, done: dict[str, dict],
                          validate: Validator | None) -> ChatResult | None:
        """The journal's record of this job (same request), else a valid cached answer, else None."""
        record = done.get(job.id)
        if record is not None and record.get("key") == key and (record.get("ok") or not self.retry_failed):
            return ChatResult(job.id, bool(record["ok"]), record.get("text"), record.get("reason"), "journal", 0,
                              key, record.get("usage") or {})
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None and isinstance(cached.get("text"), str):
            text = cached["text"]
            problem = "empty response" if not text.strip() else (validate(job, text) if validate else None)
            if problem is None:
                return ChatResult(job.id, True, text, None, "cache", 0, key, cached.get("usage") or {})
        return None

    def run(self, jobs: Iterable[ChatJob], validate: Validator | None = None) -> Iterator[ChatResult]:
        """Yield one result per job, in completion order. Done jobs (journal) and cached answers cost no call.

        Streams: `jobs` may be a generator; at most 2 x concurrency requests are queued at any time.
        """
        done = self.journal.load() if self.journal is not None else {}
        seen: set[str] = set()
        window = self.cfg.concurrency * 2
        pool: ThreadPoolExecutor | None = None
        inflight: set[Future] = set()
        ready: list[ChatResult] = []
        try:
            for job in jobs:
                if job.id in seen:
                    raise ValueError(f"duplicate job id {job.id!r}: ids must be unique for resume to work")
                seen.add(job.id)
                payload = self.payload(job.messages)
                key = self.request_key(payload)
                hit = self._already_answered(job, key, done, validate)
                if hit is not None:
                    ready.append(hit)
                    if len(ready) >= 256:
                        yield from self._commit(ready)
                        ready = []
                    continue
                if pool is None:
                    self._openai()  # fail now, loudly, when the key variable is missing
                    pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="chat")
                while len(inflight) >= window:
                    finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    ready += [f.result() for f in finished]
                    yield from self._commit(ready)
                    ready = []
                inflight.add(pool.submit(self._call, job, payload, key, validate))
            yield from self._commit(ready)
            while inflight:
                finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                yield from self._commit([f.result() for f in finished])
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self._client is not None:
            self._client.close()
            self._client = None
