"""Soak test: a bounded mixed load on a real server for minutes, watching for leaks.

Run from the repository root (not part of `make test`):

    python -m benchmarks.soak --minutes 10 --out benchmarks/results/soak.json

It starts `python -m handler serve` on the bundled SmolLM2 model (or `--model-id`) with
`--batch-size` slots, then `2 x batch size` clients send, for `--minutes`, a mix of
non-streaming and streaming TGI requests, OpenAI chat streams and two-prompt completions,
streams dropped after a few tokens (disconnects) and invalid requests (422/400). The admission
limit equals the number of clients, so two-prompt completions and dropped streams the server
has not noticed yet bring some 429s (the clients then wait about a second). Every answer must
be a success or a TGI error (`{"error", "error_type"}`, or a final error event in a stream);
anything else (a 5xx, a timeout, a malformed answer) is a failure.

Every `--sample-seconds` it samples the worker process's resident memory and threads (from
/proc). After the load: no slot busy and nothing queued (`/metrics`), thread count within the
worker's pool, RSS growth after the warm-up (the first fifth of the run, at most a minute) at
most `--rss-bound-mib`, and a greedy request answers as it did before the load. Writes the
JSON report and a Markdown summary next to it; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REQUEST_TIMEOUT = 120
PROMPTS = [
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog and then",
    "1, 2, 3, 4,",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "日本の首都は",
]
CHECK = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 16}}
AFTER_LOAD = (
    "tgi_request_count",
    "tgi_request_success",
    "tgi_request_failure",
    "tgi_queue_size",
    "tgi_batch_current_size",
)
"""The metrics the report keeps from `/metrics` after the load."""


@dataclass
class Tally:
    """Outcomes by kind of request; `failures` holds what broke the contract."""

    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, outcome: str, status: int | None, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[f"{kind}:{outcome}"] += 1
            self.statuses[str(status)] += 1
            if problem is not None:
                self.failures.append(f"{kind}: {problem}")


# --- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    if args.model_id:
        model_id = args.model_id
    else:
        from handler.testing.smollm2 import ensure_model

        model_id = str(ensure_model())
    port = free_port()
    environ = {
        **os.environ,
        "MAX_BATCH_SIZE": str(args.batch_size),
        "MAX_TOTAL_TOKENS": str(args.max_total_tokens),
        "MAX_CONCURRENT_REQUESTS": str(args.batch_size * 2),
    }
    command = [sys.executable, "-m", "handler", "serve", "--model-id", model_id]
    command += ["--hostname", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server was not ready in 300 s; see {log_path}")


def worker_pid(master: int) -> int:
    """gunicorn's worker: the master's only child."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one gunicorn worker under {master}, found {children}")
    return int(children[0])


def sample(pid: int) -> dict[str, float]:
    """Resident memory (MiB) and threads of a process."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
    }


def gauges(url: str) -> dict[str, float]:
    values = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("tgi_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# --- the load -------------------------------------------------------------------------------------


def is_tgi_error(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), str | dict) and bool(body)


def check_json(tally: Tally, kind: str, response: requests.Response) -> None:
    try:
        body = response.json()
    except ValueError:
        tally.add(kind, "malformed", response.status_code, f"not JSON: {response.text[:200]!r}")
        return
    if response.status_code >= 500:
        tally.add(kind, "server_error", response.status_code, response.text[:200])
    elif response.status_code >= 400:
        if is_tgi_error(body) and "error_type" in body:
            tally.add(kind, f"refused_{body['error_type']}", response.status_code)
        else:
            tally.add(kind, "malformed", response.status_code, response.text[:200])
    else:
        tally.add(kind, "ok", response.status_code)


def check_stream(
    tally: Tally, kind: str, response: requests.Response, drop_after: int | None = None
) -> None:
    """Read a stream to its end (or drop it after `drop_after` events)."""
    if response.status_code != 200:
        check_json(tally, kind, response)
        return
    events = 0
    last: Any = None
    for line in response.iter_lines():
        if not line.startswith(b"data: "):
            continue
        events += 1
        payload = line[len(b"data: ") :]
        last = payload if payload == b"[DONE]" else json.loads(payload)
        if drop_after is not None and events >= drop_after:
            response.close()
            tally.add(kind, "dropped", 200)
            return
    if isinstance(last, dict) and "error" in last:
        error = last["error"]
        error_type = error.get("type") if isinstance(error, dict) else last.get("error_type")
        problem = None if error_type in ("overloaded", "validation") else f"error event {last}"
        tally.add(kind, f"error_event_{error_type}", 200, problem)
    elif last == b"[DONE]" or (isinstance(last, dict) and last.get("generated_text") is not None):
        tally.add(kind, "ok", 200)
    else:
        tally.add(kind, "malformed", 200, f"stream ended without its last event: {last!r}")


def one_request(url: str, session: requests.Session, rng: random.Random, tally: Tally) -> None:
    """One request of the mix (weights in `MIX`)."""
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    prompt = rng.choice(PROMPTS)
    tokens = rng.randint(4, 48)
    sampling = {"do_sample": True, "seed": rng.randint(0, 2**32)} if rng.random() < 0.3 else {}
    parameters = {"max_new_tokens": tokens, **sampling}
    post: Callable[..., requests.Response] = session.post
    if kind == "generate":
        body = {"inputs": prompt, "parameters": {**parameters, "details": rng.random() < 0.5}}
        check_json(tally, kind, post(f"{url}/generate", json=body, timeout=REQUEST_TIMEOUT))
    elif kind == "stream":
        body = {"inputs": prompt, "parameters": parameters}
        response = post(f"{url}/generate_stream", json=body, stream=True, timeout=REQUEST_TIMEOUT)
        check_stream(tally, kind, response)
    elif kind == "chat_stream":
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        response = post(
            f"{url}/v1/chat/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT
        )
        check_stream(tally, kind, response)
    elif kind == "completions":
        body = {"prompt": rng.sample(PROMPTS, 2), "max_tokens": tokens, "temperature": 0}
        check_json(tally, kind, post(f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT))
    elif kind == "disconnect":
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 200}}
        response = post(f"{url}/generate_stream", json=body, stream=True, timeout=REQUEST_TIMEOUT)
        check_stream(tally, kind, response, drop_after=rng.randint(1, 5))
    else:
        body = rng.choice(INVALID)
        response = post(
            f"{url}/invocations",
            data=body if isinstance(body, bytes) else json.dumps(body),
            headers={"Content-Type": "application/json"},
            timeout=REQUEST_TIMEOUT,
        )
        check_json(tally, kind, response)
        if response.status_code < 400:
            tally.failures.append(f"invalid: accepted {body!r}")


MIX = {
    "generate": 25,
    "stream": 20,
    "chat_stream": 15,
    "completions": 10,
    "disconnect": 15,
    "invalid": 15,
}
INVALID: list[Any] = [
    {"inputs": "", "parameters": {"max_new_tokens": 4}},
    {"inputs": "Hi", "parameters": {"temperature": -1}},
    {"inputs": "Hi", "parameters": {"max_new_tokens": 100_000}},
    {"inputs": "word " * 2000},
    {"messages": [], "max_tokens": 4},
    {"prompt": "Hi", "suffix": "x"},
    {"text": "no known shape"},
    b'{"inputs": "unterminated',
    b'{"inputs": "\xff\xfe"}',
    b"[" * 5000,
]


def client(url: str, seed: int, until: float, tally: Tally) -> None:
    """Requests one after the other; after a 429 it waits a little, as real clients do (the
    `openai` client retries after about a second)."""
    rng = random.Random(seed)
    session = requests.Session()
    while time.monotonic() < until:
        refused = sum(v for k, v in tally.outcomes.items() if k.endswith("overloaded"))
        try:
            one_request(url, session, rng, tally)
        except requests.RequestException as error:
            tally.add("any", "no_answer", None, f"{type(error).__name__}: {error}")
            session = requests.Session()
        if sum(v for k, v in tally.outcomes.items() if k.endswith("overloaded")) > refused:
            time.sleep(rng.uniform(0.5, 1.5))


# --- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    process, url = start_server(args, log_path)
    try:
        pid = worker_pid(process.pid)
        check_before = requests.post(f"{url}/generate", json=CHECK, timeout=60).json()
        idle_before = sample(pid)
        duration = args.minutes * 60
        warm_up = min(60.0, duration / 5)
        clients = args.batch_size * 2
        tally = Tally()
        started = time.monotonic()
        until = started + duration
        threads = [
            threading.Thread(target=client, args=(url, seed, until, tally), daemon=True)
            for seed in range(clients)
        ]
        for thread in threads:
            thread.start()
        samples = []
        while time.monotonic() < until:
            samples.append({"t": round(time.monotonic() - started, 1), **sample(pid)})
            time.sleep(min(args.sample_seconds, max(0.0, until - time.monotonic())))
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT + 10)
        stuck_clients = sum(thread.is_alive() for thread in threads)
        time.sleep(2)  # cancelled requests leave at the next step
        idle_after = sample(pid)
        after_load = gauges(url)
        check_after = requests.post(f"{url}/generate", json=CHECK, timeout=60).json()
        alive = process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            exit_code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            exit_code = process.wait()

    warmed = [s for s in samples if s["t"] >= warm_up] or samples[-1:]
    rss_after_warm_up = warmed[0]["rss_mib"]
    growth = max(idle_after["rss_mib"], *(s["rss_mib"] for s in warmed)) - rss_after_warm_up
    pool = args.batch_size * 2 + 8  # gunicorn threads: MAX_CONCURRENT_REQUESTS + 8 spares
    requests_sent = sum(tally.outcomes.values())
    checks = {
        "every request answered or refused with a TGI error": not tally.failures,
        "no client stuck": stuck_clients == 0,
        "server alive through the load": alive,
        "no slot busy after the load": after_load.get("tgi_batch_current_size") == 0,
        "nothing queued after the load": after_load.get("tgi_queue_size") == 0,
        f"RSS growth after warm-up <= {args.rss_bound_mib} MiB": growth <= args.rss_bound_mib,
        "threads within the worker's pool": idle_after["threads"] <= idle_before["threads"] + pool,
        "same greedy answer before and after": check_before == check_after,
        "exit 0 on SIGTERM": exit_code == 0,
        "no traceback in the server log": "Traceback" not in log_path.read_text(errors="replace"),
    }
    return {
        "config": {
            "minutes": args.minutes,
            "batch_size": args.batch_size,
            "clients": clients,
            "max_concurrent_requests": args.batch_size * 2,
            "max_total_tokens": args.max_total_tokens,
            "warm_up_seconds": warm_up,
            "rss_bound_mib": args.rss_bound_mib,
            "mix": MIX,
        },
        "requests": requests_sent,
        "requests_per_second": round(requests_sent / duration, 2),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "statuses": dict(sorted(tally.statuses.items())),
        "failures": tally.failures[:50],
        "rss_mib": {
            "idle_before": round(idle_before["rss_mib"], 1),
            "after_warm_up": round(rss_after_warm_up, 1),
            "max_after_warm_up": round(max(s["rss_mib"] for s in warmed), 1),
            "idle_after": round(idle_after["rss_mib"], 1),
            "growth_after_warm_up": round(growth, 1),
        },
        "threads": {
            "idle_before": idle_before["threads"],
            "after_warm_up": warmed[0]["threads"],
            "max": max(s["threads"] for s in samples),
            "idle_after": idle_after["threads"],
            "pool": pool,
        },
        "after_load": {k: v for k, v in after_load.items() if k.startswith(AFTER_LOAD)},
        "samples": samples,
        "checks": checks,
        "passed": all(checks.values()),
        "log": str(log_path),
    }


def markdown(report: dict[str, Any]) -> str:
    config, rss, threads = report["config"], report["rss_mib"], report["threads"]
    lines = [
        f"# Soak: {config['minutes']} min, {config['clients']} clients, "
        f"batch {config['batch_size']}, MAX_CONCURRENT_REQUESTS "
        f"{config['max_concurrent_requests']}",
        "",
        f"{report['requests']} requests ({report['requests_per_second']}/s): "
        + ", ".join(f"{k} {v}" for k, v in report["outcomes"].items()),
        "",
        "| RSS (MiB) | idle before | after warm-up | max after warm-up | idle after | growth |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| worker | {rss['idle_before']} | {rss['after_warm_up']} | "
        f"{rss['max_after_warm_up']} | {rss['idle_after']} | {rss['growth_after_warm_up']} |",
        "",
        f"Threads: {threads['idle_before']} idle before, {threads['after_warm_up']} after the "
        f"warm-up, {threads['max']} at most, {threads['idle_after']} idle after "
        f"(pool {threads['pool']}).",
        "",
        "| check | result |",
        "| --- | --- |",
        *(f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in report["checks"].items()),
    ]
    if report["failures"]:
        lines += ["", "Failures:", *(f"- {failure}" for failure in report["failures"][:20])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-total-tokens", type=int, default=512)
    parser.add_argument("--model-id", help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--rss-bound-mib", type=float, default=50.0)
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    args = parser.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    summary = markdown(report)
    out.with_suffix(".md").write_text(summary)
    print(summary)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
