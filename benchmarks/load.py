"""A load generator: C concurrent clients over HTTP, or requests arriving at random times.

Closed loop (`run_level`): C client threads, each with its own keep-alive session, send
`warmup_rounds` requests each, wait for one another, then `rounds` measured requests each, one
after the other. All clients start the measured part together, so at C = batch size the server
sees full batches as the bare loop of the ceiling does.

Open loop (`run_arrivals`): requests arrive as a Poisson process at a given rate, each on its own
thread, whatever the server's progress: prefills keep landing between running streams' tokens,
which is what inter-token latency under arrivals measures.

Three wire formats:

- `OpenAICompletions`: POST `/v1/completions` streaming, greedy, `ignore_eos`: the one every
  system of `make bench` is measured with (ours, llama.cpp, vLLM), so all generate exactly
  `max_new_tokens` tokens of the same prompts. Time to first token is the first token event;
  inter-token latencies are the gaps between token events as the client receives them.
- `TgiStream`: our server's POST `/generate_stream` (server-sent events). Time to first token is
  the first token event; inter-token latencies are the gaps between token events as the client
  receives them. Our HTTP API has no switch to ignore EOS, so requests stop at `max_new_tokens`
  or EOS; the prompts below were chosen so that SmolLM2 greedy runs 64 tokens without EOS, and
  the mean generated length is reported so that a difference shows.
- `SageMakerInvocations`: the peer's POST `/invocations`, not streaming (the toolkit answers
  once): time to first token is the end-to-end time there. It is asked for exactly
  `max_new_tokens` (`min_new_tokens` too), so its length is `max_new_tokens` by construction.

    python -m benchmarks.load --url http://127.0.0.1:8080 --levels 1,4,8
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import requests

from benchmarks.monitor import GroupMonitor, GroupUsage, Quiet

PROMPTS: tuple[str, ...] = (
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog and then",
    "Explain photosynthesis to a five year old child in simple words, please:",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "The history of the Roman Empire began",
    "List three tips for staying healthy during the winter months:",
    "In computer science, a hash table is",
    "Dear hiring manager, I am writing to apply for the position of",
    "The main differences between renewable and non-renewable energy sources are that renewable "
    "sources, such as solar, wind and hydroelectric power, are replenished naturally over short "
    "periods of time, while",
    "Write a short poem about the sea. The first line of the poem is: The waves",
    "Q: What causes the seasons on Earth? A: The seasons are caused by",
    "Translate to French: The weather is nice today, so we are going to the park. French:",
    "The following is a detailed report on a detective story in which a missing painting is "
    "found in the museum's basement. The report begins:",
    "The committee met on Tuesday to review the proposal for the new library. The building would "
    "have three floors, a reading room facing the river, a children's section with a small "
    "theatre, and a workshop where volunteers repair old books. Members raised questions about "
    "the budget, the schedule and the noise from construction near the school. The architect "
    "answered each question in turn, showing drawings and cost estimates, and promised a revised "
    "plan within a month. After a long discussion, the chair summarized the points of agreement "
    "and disagreement as follows:",
    "Machine learning systems are trained on data, and the quality of that data matters as much "
    "as the model itself. In practice, teams spend most of their time collecting, cleaning and "
    "labelling examples, writing tests for data pipelines, monitoring for drift after deployment, "
    "and deciding when a model must be retrained. A good data pipeline is versioned, "
    "reproducible and documented, so that anyone can rebuild the training set from raw sources. "
    "Evaluation sets should be kept separate from training data and refreshed as the world "
    "changes. When a model fails in production, the first place to look is usually the data: "
    "missing values, shifted distributions, duplicated records or labels that changed meaning "
    "over time. To build a reliable system, the most important steps are",
)
"""Varied prompts (6 to 145 SmolLM2 tokens) whose greedy continuations run 64 tokens without
EOS on SmolLM2-135M-Instruct, so that every system generates the same lengths."""

TIMEOUT_S = (10.0, 900.0)
"""Connect and read timeouts: a peer serving one request at a time queues the others."""


@dataclass
class RequestResult:
    """One request as the client saw it; times from `time.perf_counter()`."""

    start: float
    end: float
    generated_tokens: int = 0
    ttft_s: float | None = None
    """To the first token event when streaming, else the end-to-end time."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive token events (streaming only)."""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def e2e_s(self) -> float:
        return self.end - self.start


class Client(Protocol):
    """Sends one generation request and times it."""

    streaming: bool

    def send(self, session: requests.Session, prompt: str) -> RequestResult: ...


@dataclass(frozen=True)
class TgiStream:
    """Our server: POST `/generate_stream`, greedy, `details` for the finish reason."""

    url: str
    max_new_tokens: int
    streaming: bool = True

    def send(self, session: requests.Session, prompt: str) -> RequestResult:
        body = {
            "inputs": prompt,
            "parameters": {
                "max_new_tokens": self.max_new_tokens,
                "do_sample": False,
                "details": True,
            },
        }
        start = time.perf_counter()
        result = RequestResult(start=start, end=start)
        last_token = start
        try:
            with session.post(
                f"{self.url}/generate_stream", json=body, stream=True, timeout=TIMEOUT_S
            ) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return result
                # chunk_size=None hands over each chunk as it arrives, not every 512 bytes.
                for line in response.iter_lines(chunk_size=None):
                    if not line.startswith(b"data:"):
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[5:])
                    if "error" in event:
                        result.error = str(event["error"])[:200]
                        break
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last_token)
                    last_token = now
                    result.generated_tokens += 1
                    if event.get("details"):
                        result.finish_reason = event["details"]["finish_reason"]
        except (requests.RequestException, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            result.end = time.perf_counter()
        return result


@dataclass(frozen=True)
class OpenAICompletions:
    """Any OpenAI-compatible server (ours, llama.cpp's `llama-server`, vLLM): POST
    `/v1/completions` streaming, greedy (`temperature: 0`), `ignore_eos` so that every request
    runs exactly `max_new_tokens` tokens.

    Each event carrying a choice counts as one token (the servers send one per token; vLLM's
    events can carry an empty text for an incomplete UTF-8 sequence, still one token); when the
    server reports `usage` (`stream_options.include_usage`), its `completion_tokens` is the count.
    """

    url: str
    max_new_tokens: int
    model: str | None = None
    """The `model` field; vLLM wants the name it serves, the others take any."""
    streaming: bool = True

    def send(self, session: requests.Session, prompt: str) -> RequestResult:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        start = time.perf_counter()
        result = RequestResult(start=start, end=start)
        last_token = start
        usage_tokens = None
        try:
            with session.post(
                f"{self.url}/v1/completions", json=body, stream=True, timeout=TIMEOUT_S
            ) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return result
                for line in response.iter_lines(chunk_size=None):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    now = time.perf_counter()
                    event = json.loads(payload)
                    if "error" in event:
                        result.error = str(event["error"])[:200]
                        break
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens")
                    choices = event.get("choices") or []
                    if not choices:
                        continue
                    if choices[0].get("finish_reason"):
                        result.finish_reason = choices[0]["finish_reason"]
                    if not choices[0].get("text") and choices[0].get("finish_reason"):
                        continue  # a closing event with no token of its own
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last_token)
                    last_token = now
                    result.generated_tokens += 1
        except (requests.RequestException, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            result.end = time.perf_counter()
        if usage_tokens is not None and result.error is None:
            result.generated_tokens = usage_tokens
        return result


@dataclass(frozen=True)
class SageMakerInvocations:
    """The peer: POST `/invocations` with `{"inputs", "parameters"}`, exactly `max_new_tokens`."""

    url: str
    max_new_tokens: int
    streaming: bool = False

    def send(self, session: requests.Session, prompt: str) -> RequestResult:
        body = {
            "inputs": prompt,
            "parameters": {
                "max_new_tokens": self.max_new_tokens,
                "min_new_tokens": self.max_new_tokens,
                "do_sample": False,
                "return_full_text": False,
            },
        }
        start = time.perf_counter()
        result = RequestResult(start=start, end=start)
        try:
            response = session.post(f"{self.url}/invocations", json=body, timeout=TIMEOUT_S)
            result.end = time.perf_counter()
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            answer = response.json()
            if not (isinstance(answer, list) and "generated_text" in answer[0]):
                result.error = f"unexpected answer: {str(answer)[:200]}"
                return result
        except (requests.RequestException, ValueError) as exc:
            result.end = time.perf_counter()
            result.error = f"{type(exc).__name__}: {exc}"[:200]
            return result
        result.ttft_s = result.e2e_s
        result.generated_tokens = self.max_new_tokens
        result.finish_reason = "length"
        return result


# --- summaries ---------------------------------------------------------------------------------


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1e3) if values else None


@dataclass(frozen=True)
class LoadResult:
    """One measured level (closed loop) or one arrivals run (open loop)."""

    concurrency: int | None
    """Clients in the closed loop; None under arrivals."""
    arrival_rate_rps: float | None
    """Poisson arrival rate under arrivals; None in the closed loop."""
    requests: int
    errors: int
    duration_s: float
    tok_s: float
    """Generated tokens of the successful requests per second of the measured window."""
    req_s: float
    mean_generated_tokens: float
    finish_reasons: dict[str, int]
    streaming: bool
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    itl_p50_ms: float | None
    itl_p90_ms: float | None
    e2e_p50_ms: float | None
    e2e_p90_ms: float | None
    mean_in_flight: float
    """Requests in flight on average over the window (sum of end-to-end times / window)."""
    first_error: str | None
    server: GroupUsage | None = None
    quiet: Quiet | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    results: Sequence[RequestResult],
    started: float,
    streaming: bool,
    concurrency: int | None = None,
    arrival_rate_rps: float | None = None,
    server: GroupUsage | None = None,
    quiet: Quiet | None = None,
) -> LoadResult:
    ok = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    duration = max((r.end for r in results), default=started) - started
    tokens = sum(r.generated_tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    e2e = [r.e2e_s for r in ok]
    return LoadResult(
        concurrency=concurrency,
        arrival_rate_rps=arrival_rate_rps,
        requests=len(results),
        errors=len(failed),
        duration_s=duration,
        tok_s=tokens / duration if duration > 0 else 0.0,
        req_s=len(ok) / duration if duration > 0 else 0.0,
        mean_generated_tokens=tokens / len(ok) if ok else 0.0,
        finish_reasons=dict(Counter(r.finish_reason or "none" for r in ok)),
        streaming=streaming,
        ttft_p50_ms=percentile_ms(ttft, 50),
        ttft_p90_ms=percentile_ms(ttft, 90),
        itl_p50_ms=percentile_ms(itl, 50) if streaming else None,
        itl_p90_ms=percentile_ms(itl, 90) if streaming else None,
        e2e_p50_ms=percentile_ms(e2e, 50),
        e2e_p90_ms=percentile_ms(e2e, 90),
        mean_in_flight=sum(e2e) / duration if duration > 0 else 0.0,
        first_error=failed[0].error if failed else None,
        server=server,
        quiet=quiet,
    )


def send_safely(client: Client, session: requests.Session, prompt: str) -> RequestResult:
    """`client.send`, with any unexpected exception recorded as the request's error: a client
    thread that died would leave the others waiting at the start barrier."""
    start = time.perf_counter()
    try:
        return client.send(session, prompt)
    except Exception as exc:
        return RequestResult(start, time.perf_counter(), error=f"{type(exc).__name__}: {exc}")


# --- closed loop -------------------------------------------------------------------------------


def run_level(
    client: Client,
    concurrency: int,
    rounds: int,
    warmup_rounds: int,
    prompts: Sequence[str] = PROMPTS,
    monitor: GroupMonitor | None = None,
    quiet: Quiet | None = None,
) -> LoadResult:
    """`concurrency` clients send `warmup_rounds` unmeasured then `rounds` measured requests each.

    Client `i` sends prompt `(i + round * concurrency) % len(prompts)`, so every level walks the
    prompt list in the same order.
    """
    results: list[list[RequestResult]] = [[] for _ in range(concurrency)]
    marks: dict[str, Any] = {}

    def start_measuring() -> None:
        if monitor is not None:
            marks["window"] = monitor.start_window()
        marks["started"] = time.perf_counter()

    barrier = threading.Barrier(concurrency, action=start_measuring)

    def run_client(i: int) -> None:
        with requests.Session() as session:
            for r in range(warmup_rounds + rounds):
                if r == warmup_rounds:
                    barrier.wait()
                prompt = prompts[(i + r * concurrency) % len(prompts)]
                result = send_safely(client, session, prompt)
                if r >= warmup_rounds:
                    results[i].append(result)

    threads = [
        threading.Thread(target=run_client, args=(i,), name=f"client-{i}", daemon=True)
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server = marks["window"].finish() if "window" in marks else None
    flat = [r for per_client in results for r in per_client]
    return summarize(
        flat,
        marks["started"],
        client.streaming,
        concurrency=concurrency,
        server=server,
        quiet=quiet,
    )


# --- open loop ---------------------------------------------------------------------------------


def arrival_times(rate_rps: float, requests_count: int, seed: int = 0) -> list[float]:
    """Offsets in seconds of a Poisson process at `rate_rps`, the first at 0."""
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(requests_count):
        offsets.append(now)
        now += rng.expovariate(rate_rps)
    return offsets


def run_arrivals(
    client: Client,
    rate_rps: float,
    requests_count: int,
    prompts: Sequence[str] = PROMPTS,
    monitor: GroupMonitor | None = None,
    quiet: Quiet | None = None,
    seed: int = 0,
) -> LoadResult:
    """Send `requests_count` requests at Poisson arrival times, each on its own thread."""
    results: list[RequestResult | None] = [None] * requests_count

    def send(i: int) -> None:
        with requests.Session() as session:
            results[i] = send_safely(client, session, prompts[i % len(prompts)])

    window = monitor.start_window() if monitor is not None else None
    started = time.perf_counter()
    threads = []
    for i, offset in enumerate(arrival_times(rate_rps, requests_count, seed)):
        time.sleep(max(0.0, started + offset - time.perf_counter()))
        thread = threading.Thread(target=send, args=(i,), name=f"arrival-{i}", daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    server = window.finish() if window is not None else None
    done = [r for r in results if r is not None]
    return summarize(
        done, started, client.streaming, arrival_rate_rps=rate_rps, server=server, quiet=quiet
    )


# --- command line ------------------------------------------------------------------------------

CLIENTS: dict[str, Callable[[str, int], Client]] = {
    "openai": OpenAICompletions,
    "tgi": TgiStream,
    "sagemaker": SageMakerInvocations,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Load a running server: closed-loop levels, then optional Poisson arrivals.",
    )
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080")
    parser.add_argument("--api", choices=sorted(CLIENTS), default="openai")
    parser.add_argument("--levels", default="1,4,8,16", help="client counts, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="measured requests per client")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--arrival-rate", type=float, default=None, help="requests/s")
    parser.add_argument("--arrival-requests", type=int, default=32)
    args = parser.parse_args(argv)
    client = CLIENTS[args.api](args.url.rstrip("/"), args.max_new_tokens)
    report = []
    for level in (int(c) for c in args.levels.split(",")):
        result = run_level(client, level, args.rounds, args.warmup_rounds)
        report.append(result.as_dict())
    if args.arrival_rate:
        report.append(run_arrivals(client, args.arrival_rate, args.arrival_requests).as_dict())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
