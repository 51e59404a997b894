"""The images API end to end: real ``sd35fp8 serve`` subprocesses on 127.0.0.1, real HTTP, the tiny model.

Two servers per module: ``server`` (roomy queue, generous rate: correctness and the load test) and ``busy``
(queue of 1, 4 requests a minute per key: queue-full, rate limit, disconnect). Both are always stopped
(``serve_in_background`` is a context manager). The last test reads both servers' whole output and checks
that no API key and no prompt appear in it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sd35fp8_helpers.cli import main
from sd35fp8_helpers.errors import Sd35fp8Error, ServerStartFailed
from sd35fp8_helpers.serving.app import _error_for
from sd35fp8_helpers.serving.auth import (
    MAX_RATE_IDENTITIES,
    KeyStore,
    RateLimiter,
    bearer_token,
    hash_api_key,
    new_api_key,
    parse_key_line,
)
from sd35fp8_helpers.serving.client import decode_images, read_metrics, serve_in_background
from sd35fp8_helpers.serving.config import MAX_IMAGES, MAX_PROMPT_CHARS, MAX_STEPS, ServeConfig
from sd35fp8_helpers.serving.engine import ImageEngine
from sd35fp8_helpers.serving.service import ImageService, Job

ROUTE = "/v1/images/generations"
MARKER = "zebra-7f3a"  # in every prompt sent; must never reach a log line
KEYS = {name: new_api_key() for name in ("main", "load", "queue1", "queue2", "queue3", "rate", "other", "gone",
                                         "cap", "cap2")}
LOAD_REQUESTS, LOAD_CLIENTS, LOAD_DEADLINE_S = 200, 16, 150
RSS_GROWTH_BOUND = 64 * 2**20
"""The server's RSS may not grow more than this across the load test (measured after a warm-up)."""


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def _prompt(text: str = "a red fox") -> str:
    return f"{text} {MARKER}"


def _png_sizes(body: dict) -> list[tuple[int, int]]:
    assert all(base64.b64decode(d["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n" for d in body["data"])
    return [img.size for img in decode_images(body)]


def _metric(url: str, name: str, labels: str = "") -> float:
    return read_metrics(url, prefix="").get(name + labels, 0.0)


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server():
    with serve_in_background("tiny", api_keys={k: KEYS[k] for k in ("main", "load")},
                             args=["--queue-size", "32", "--rate", "6000", "--burst", "1000"]) as s:
        yield s


@pytest.fixture(scope="module")
def busy():
    with serve_in_background("tiny", api_keys={k: v for k, v in KEYS.items() if k not in ("main", "load")},
                             args=["--queue-size", "1", "--rate", "4"]) as s:
        yield s


# --- valid requests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,n", [("64x64", 1), ("128x64", 2)])
def test_valid_requests_return_pngs_of_the_requested_size(server, size, n):
    r = httpx.post(f"{server.url}{ROUTE}", headers=_auth("main"), timeout=120,
                   json={"prompt": _prompt(), "size": size, "n": n, "steps": 2, "seed": 7,
                         "response_format": "b64_json", "model": "tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == n
    w, h = (int(x) for x in size.split("x"))
    assert _png_sizes(body) == [(w, h)] * n
    assert [d["seed"] for d in body["data"]] == list(range(7, 7 + n))


def test_same_seed_gives_the_same_image_and_request_id_is_echoed(server):
    body = {"prompt": _prompt(), "size": "64x64", "steps": 2, "seed": 3}
    a, b = (httpx.post(f"{server.url}{ROUTE}", headers={**_auth("main"), "X-Request-ID": f"req-{i}"}, json=body,
                       timeout=120) for i in (1, 2))
    assert decode_images(a.json())[0].tobytes() == decode_images(b.json())[0].tobytes()  # PNG metadata has times
    assert (a.headers["x-request-id"], b.headers["x-request-id"]) == ("req-1", "req-2")
    bad = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "no spaces {allowed}"})
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])  # replaced, never logged as sent


def test_openai_client_images_generate(server):
    from openai import OpenAI

    client = OpenAI(api_key=KEYS["main"], base_url=f"{server.url}/v1", max_retries=0, timeout=120)
    result = client.images.generate(model="tiny", prompt=_prompt(), size="64x64", n=1,
                                    response_format="b64_json", extra_body={"steps": 2, "seed": 1})
    assert _png_sizes(result.model_dump()) == [(64, 64)]


def test_health_ready_and_metrics_change_as_requests_are_served(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["model"] == "tiny"
    before = {name: _metric(server.url, name, labels) for name, labels in (
        ("sd35fp8_images_generated_total", ""), ("sd35fp8_request_duration_seconds_count", '{status="200"}'),
        ("sd35fp8_errors_total", '{kind="invalid_api_key"}'))}
    httpx.post(f"{server.url}{ROUTE}", headers=_auth("main"), json={"prompt": _prompt(), "size": "64x64", "n": 2,
                                                                   "steps": 2}, timeout=120)
    httpx.post(f"{server.url}{ROUTE}", json={"prompt": _prompt()})
    text = httpx.get(f"{server.url}/metrics").text
    assert _metric(server.url, "sd35fp8_images_generated_total") == before["sd35fp8_images_generated_total"] + 2
    assert (_metric(server.url, "sd35fp8_request_duration_seconds_count", '{status="200"}')
            == before["sd35fp8_request_duration_seconds_count"] + 1)
    assert (_metric(server.url, "sd35fp8_errors_total", '{kind="invalid_api_key"}')
            == before["sd35fp8_errors_total"] + 1)
    for series in ("sd35fp8_queue_depth 0.0", "sd35fp8_jobs_running", "process_resident_memory_bytes",
                   'sd35fp8_request_duration_seconds_bucket{le="0.5",status="200"}'):
        assert series in text


# --- bad input: each its 4xx and message ---------------------------------------------------------------------

BAD = [
    (b"{not json", 400, None, "the request body is not valid JSON"),
    (b"[1, 2]", 400, None, "the request body must be a JSON object"),
    ({"prompt": ""}, 400, "prompt", "prompt='' is empty fix: describe the image you want"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt",
     f"prompt is {MAX_PROMPT_CHARS + 1} characters; the limit is {MAX_PROMPT_CHARS}"),
    ({"prompt": 5}, 400, "prompt", "prompt: Input should be a valid string"),
    ({"prompt": "x", "size": "100x100"}, 400, "size", "height=100 is not a multiple of 16; nearest valid: 96 or 112"),
    ({"prompt": "x", "size": "64x200"}, 400, "size", "height=200 is not a multiple of 16; nearest valid: 192 or 208"),
    ({"prompt": "x", "size": "512x512"}, 400, "size", "height=512 is over this model's single-pass limit of 256 px"),
    ({"prompt": "x", "size": "large"}, 400, "size", "size='large' is not WIDTHxHEIGHT, e.g. '128x128'"),
    ({"prompt": "x", "n": 0}, 400, "n", f"n=0 is out of range: 1 to {MAX_IMAGES} images per request"),
    ({"prompt": "x", "n": MAX_IMAGES + 1}, 400, "n", f"n={MAX_IMAGES + 1} is out of range"),
    ({"prompt": "x", "n": "two"}, 400, "n", "n: Input should be a valid integer"),
    ({"prompt": "x", "steps": MAX_STEPS + 1}, 400, "steps", f"steps={MAX_STEPS + 1} is over this server's limit"),
    ({"prompt": "x", "steps": 0}, 400, "steps", "steps=0 must be a whole number from 1"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "seed=-1 must be a whole number from 0 to 2**64-1"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format", "response_format='url' is not supported"),
    ({"prompt": "x", "model": "dall-e-3"}, 400, "model", "model='dall-e-3' is not served here; this server serves 'tiny'"),
    ({"prompt": "x", "quality": "hd"}, 400, "quality", "unknown field 'quality'; this server takes: prompt"),
    ({"size": "64x64"}, 400, "prompt", "prompt: Field required"),
]


@pytest.mark.parametrize("body,status,param,message", BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_input_is_a_4xx_in_openai_error_shape(server, body, status, param, message):
    kwargs = {"content": body, "headers": {**_auth("main"), "Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body, "headers": _auth("main")}
    r = httpx.post(f"{server.url}{ROUTE}", timeout=30, **kwargs)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"]


def test_oversized_body_and_unknown_route(server):
    r = httpx.post(f"{server.url}{ROUTE}", headers=_auth("main"), content=b" " * 70_000)
    assert r.status_code == 413 and "over 65536 bytes" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def _raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send ``head`` (request line + headers) and ``body`` on a raw socket, then read what comes back without
    sending anything more: a server that waits for the rest of a promised body never answers (timeout)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        return answer


def test_a_body_over_the_limit_is_refused_without_reading_the_rest(server):
    """Issue 12: the body used to be read whole first. A client that promises 10 MB, or streams chunks without a
    length, hears 413 once 64 KiB arrived — the test never sends the rest, so a server that waits for it fails."""
    head = f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['main']}\r\nContent-Type: application/json\r\n"
    promised = _raw_request(server.url, head + "Content-Length: 10000000\r\n\r\n", b"{")
    assert promised.startswith(b"HTTP/1.1 413"), promised[:200]
    assert b"the request body is over 65536 bytes" in promised
    chunk = b" " * 8192
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10))  # 80 KiB, no final chunk
    streamed = _raw_request(server.url, head + "Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert streamed.startswith(b"HTTP/1.1 413"), streamed[:200]
    assert b'"code":"body_too_large"' in streamed.replace(b" ", b"")


ABSURD = [  # raw JSON, the param named in the 400
    ('{"prompt": "x", "seed": 18446744073709551616}', "seed"),           # 2**64: beyond 64 bits
    ('{"prompt": "x", "seed": 18446744073709551615, "n": 2}', "seed"),   # image 2 would have seed 2**64
    ('{"prompt": "x", "seed": 1000000000000000000000000000000}', "seed"),
    ('{"prompt": "x", "seed": 1e400}', "seed"),
    ('{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": Infinity}', "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": -Infinity}', "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": "nan"}', "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": 1e400}', "guidance_scale"),
    ('{"prompt": "x", "steps": true}', "steps"),
    ('{"prompt": "x", "n": true}', "n"),
    ('{"prompt": "x", "seed": false}', "seed"),
    ('{"prompt": "x", "steps": -3}', "steps"),
    ('{"prompt": "x", "steps": 1e300}', "steps"),
    ('{"prompt": "x", "n": 100000}', "n"),
    ('{"prompt": "x", "n": -1}', "n"),
    ('{"prompt": "x", "size": "99999x64"}', "size"),
    ('{"prompt": "x", "negative_prompt": "%s"}' % ("y" * (MAX_PROMPT_CHARS + 1)), "negative_prompt"),
]


@pytest.mark.parametrize("raw,param", ABSURD, ids=[f"{p}:{r[16:50]}" for r, p in ABSURD])
def test_absurd_numbers_are_a_400_before_any_work(server, raw, param):
    """Issue 12: never a 500 and never a generated image — and nothing handed to the worker (no job event)."""
    rid = f"absurd-{abs(hash(raw)) % 10**12}"
    r = httpx.post(f"{server.url}{ROUTE}", content=raw.encode(), timeout=60,
                   headers={**_auth("main"), "Content-Type": "application/json", "X-Request-ID": rid})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["code"] in ("invalid_value", "invalid_type")
    work = [e for e in server.log_events() if e.get("request_id") == rid and e.get("event") != "request"]
    assert work == [], f"the request reached the worker: {work}"


def test_one_key_cannot_fill_the_queue(busy):
    """Issue 12: the per-key in-flight cap (queue of 1 → 1 job per key). The same key's second request is a 429
    at once although the queue has room; another key still gets in."""
    slow = {"prompt": _prompt("slow"), "size": "256x256", "steps": MAX_STEPS}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{busy.url}{ROUTE}", headers=_auth("cap"), json=slow, timeout=300)
        assert _wait_for(lambda: _metric(busy.url, "sd35fp8_jobs_running") == 1)
        again = httpx.post(f"{busy.url}{ROUTE}", headers=_auth("cap"), timeout=120,
                           json={"prompt": _prompt(), "size": "64x64", "steps": 1})
        assert _metric(busy.url, "sd35fp8_queue_depth") == 0  # there was room: the cap said no, not the queue
        assert again.status_code == 429 and again.json()["error"]["code"] == "too_many_in_flight", again.text
        assert "this key already has 1 jobs queued or running" in again.json()["error"]["message"]
        assert int(again.headers["retry-after"]) >= 1
        other = pool.submit(httpx.post, f"{busy.url}{ROUTE}", headers=_auth("cap2"), timeout=120,
                            json={"prompt": _prompt(), "size": "64x64", "steps": 1})
        assert first.result().status_code == 200 and other.result().status_code == 200


@pytest.mark.parametrize("args,message", [
    (["--no-auth", "--max-in-flight", "0"], "--max-in-flight 0 must be >= 1"),
    (["--no-auth", "--broker", "http://127.0.0.1:6379"], "--broker 'http://127.0.0.1:6379' is not a Redis URL"),
])
def test_serve_refuses_bad_queue_options(capsys, args, message):
    assert main(["serve", *args]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("header", [None, "Bearer sk-sd35fp8-wrong", "Basic dXNlcjpwYXNz", "Bearer",
                                    f"Token {KEYS['main']}"])
def test_missing_or_wrong_key_is_401(server, header):
    r = httpx.post(f"{server.url}{ROUTE}", json={"prompt": _prompt()},
                   headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == {"message": "missing or invalid API key: send 'Authorization: Bearer YOUR_KEY'",
                                 "type": "authentication_error", "param": None, "code": "invalid_api_key"}


# --- the load test -------------------------------------------------------------------------------------------

def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def test_load_200_requests_16_clients(server):
    """Bounded: 200 requests, 16 threads, each stops at the deadline. Zero 5xx, every accepted one answered,
    RSS growth after warm-up within :data:`RSS_GROWTH_BOUND`. Figures printed and written to a JSON file."""
    body = {"prompt": _prompt("load"), "size": "64x64", "steps": 2}
    with httpx.Client(timeout=60) as c:  # warm-up: first calls allocate buffers the steady state reuses
        for i in range(LOAD_CLIENTS):
            assert c.post(f"{server.url}{ROUTE}", headers=_auth("load"), json={**body, "seed": i}).status_code == 200
    rss_before = _rss(server.pid)
    lock, issued, results = threading.Lock(), [0], []
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def client(worker: int) -> None:
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= LOAD_REQUESTS:
                        return
                    issued[0] += 1
                    seed = issued[0]
                start = time.perf_counter()
                try:
                    status = c.post(f"{server.url}{ROUTE}", headers=_auth("load"), json={**body, "seed": seed}).status_code
                except httpx.HTTPError as exc:  # no answer at all: counted, fails the test below
                    status = type(exc).__name__
                with lock:
                    results.append((status, time.perf_counter() - start))

    start = time.perf_counter()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        list(pool.map(client, range(LOAD_CLIENTS)))
    wall = time.perf_counter() - start
    rss_after = _rss(server.pid)
    ok = sorted(s for code, s in results if code == 200)
    rejected = [code for code, _ in results if code in (429, 503)]
    figures = {
        "requests": len(results), "clients": LOAD_CLIENTS, "accepted_and_answered": len(ok), "rejected": len(rejected),
        "statuses": {str(k): sum(1 for c, _ in results if c == k) for k in {c for c, _ in results}},
        "p50_s": round(statistics.median(ok), 3) if ok else None,
        "p95_s": round(ok[max(0, int(len(ok) * 0.95) - 1)], 3) if ok else None,
        "wall_s": round(wall, 2), "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1), "rss_bound_mib": RSS_GROWTH_BOUND / 2**20,
        "size": body["size"], "steps": body["steps"],
    }
    out = Path(os.environ["SD35FP8_OUTPUT_DIR"]) / "serve_load_test.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"\nload test: {json.dumps(figures)}\n(written to {out})")
    assert len(results) == LOAD_REQUESTS, f"only {len(results)} requests finished before the deadline"
    assert all(isinstance(code, int) and code < 500 for code, _ in results), figures["statuses"]
    assert len(ok) + len(rejected) == LOAD_REQUESTS, figures["statuses"]
    assert rss_after - rss_before < RSS_GROWTH_BOUND, figures


# --- queue, rate limit, disconnect (the busy server: queue of 1, 4 requests a minute per key) ----------------

def test_queue_full_is_an_immediate_429_and_accepted_requests_are_answered(busy):
    slow = {"prompt": _prompt("slow"), "size": "256x256", "steps": MAX_STEPS}  # 1 s idle, 40 s on busy cores
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{busy.url}{ROUTE}", headers=_auth("queue1"), json=slow, timeout=300)
        assert _wait_for(lambda: _metric(busy.url, "sd35fp8_jobs_running") == 1)
        second = pool.submit(httpx.post, f"{busy.url}{ROUTE}", headers=_auth("queue2"), json=slow, timeout=300)
        assert _wait_for(lambda: _metric(busy.url, "sd35fp8_queue_depth") == 1)
        third = httpx.post(f"{busy.url}{ROUTE}", headers=_auth("queue3"), json=slow, timeout=300)
        assert not first.done() or not second.done()  # answered while the queue was still full
        assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
        assert third.json()["error"]["code"] == "queue_full"
        assert "the server is busy: 1 requests are already waiting" in third.json()["error"]["message"]
        assert first.result().status_code == 200 and second.result().status_code == 200


def test_rate_limit_is_429_with_retry_after_per_key(busy):
    for _ in range(4):  # the burst: 4 requests (bad JSON is cheap, and still counts)
        assert httpx.post(f"{busy.url}{ROUTE}", headers=_auth("rate"), content=b"{").status_code == 400
    r = httpx.post(f"{busy.url}{ROUTE}", headers=_auth("rate"), json={"prompt": _prompt()})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 15
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "rate limit of 4 requests per minute reached for this key; retry after" in r.json()["error"]["message"]
    assert httpx.post(f"{busy.url}{ROUTE}", headers=_auth("other"), content=b"{").status_code == 400  # per key


def test_client_that_disconnects_has_its_job_cancelled(busy):
    images = _metric(busy.url, "sd35fp8_images_generated_total")
    body = json.dumps({"prompt": _prompt("never finished"), "size": "256x256", "steps": MAX_STEPS, "n": MAX_IMAGES})
    host, port = busy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # a client that will hang up
        sock.sendall(f"POST {ROUTE} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEYS['gone']}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        assert _wait_for(lambda: _metric(busy.url, "sd35fp8_jobs_running") == 1)
    assert _wait_for(lambda: _metric(busy.url, "sd35fp8_errors_total", '{kind="client_disconnected"}') == 1)
    assert _wait_for(lambda: _metric(busy.url, "sd35fp8_jobs_running") == 0)
    assert any(e.get("event") == "job_failed" and e.get("error_type") == "JobCancelled"
               and e.get("reason") == "client_disconnected" for e in busy.log_events())
    assert _metric(busy.url, "sd35fp8_images_generated_total") == images  # the image was never finished


# --- without HTTP: OOM, keys, limits, start-up failures ------------------------------------------------------

@pytest.fixture(scope="module")
def own_pipe(tiny_model_dir):
    """A tiny pipeline of this module's own (the OOM test hooks it)."""
    from sd35fp8_helpers import load_pipeline

    return load_pipeline(str(tiny_model_dir), device="cpu")


@contextlib.contextmanager
def _in_process_server(config: ServeConfig, pipe):
    """The same app under uvicorn in a thread of this process (its records reach ``caplog``)."""
    import uvicorn

    from sd35fp8_helpers.serving.app import create_app
    from sd35fp8_helpers.serving.client import free_port

    port = free_port()
    app = create_app(config, KeyStore([]), engine=ImageEngine("tiny", pipe=pipe))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait_for(lambda: server.started and httpx.get(f"{url}/readyz").status_code == 200)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_request_past_its_deadline_is_cancelled_with_504_and_prompts_are_logged_only_when_asked(own_pipe, caplog):
    caplog.set_level(logging.INFO, logger="sd35fp8.serve")
    with _in_process_server(ServeConfig(model="tiny", timeout_s=0.5, require_auth=False, log_prompts=True), own_pipe) as url:
        r = httpx.post(f"{url}{ROUTE}", json={"prompt": "slow", "size": "256x256", "steps": MAX_STEPS}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert "longer than the server's --timeout (0.5 s) and was cancelled" in r.json()["error"]["message"]
        assert httpx.post(f"{url}{ROUTE}", json={"prompt": "quick fox", "size": "64x64", "steps": 1},
                          timeout=60).status_code == 200
    fields = [getattr(rec, "fields", {}) for rec in caplog.records]
    assert {"error_type": "JobCancelled", "reason": "deadline"}.items() <= next(
        f for f in fields if f.get("reason")).items()
    assert any(f.get("prompt") == "quick fox" for f in fields)  # --log-prompts: the one case prompts are logged


def test_out_of_memory_in_one_job_is_a_503_and_the_worker_keeps_serving(own_pipe):
    from sd35fp8_helpers.memory.strategies import emulated_card
    from sd35fp8_helpers.pipeline.generation import GenerationSettings

    pipe = own_pipe
    service = ImageService(ImageEngine("tiny", pipe=pipe), ServeConfig(queue_size=2))
    service.start()
    try:
        settings = [GenerationSettings("a fox", steps=2, height=64, width=64)]
        with emulated_card(1, pipe):  # a real torch.OutOfMemoryError at the first denoising step
            job = Job(settings, "r1", "k")
            service.submit(job)
            exc = job.future.exception(timeout=60)
        error = _error_for(exc)
        assert (error.status, error.code, error.headers["Retry-After"]) == (503, "out_of_memory", "5")
        assert "the server freed memory and keeps serving" in error.message
        job = Job(settings, "r2", "k")
        service.submit(job)
        assert job.future.result(timeout=60)[0].image.size == (64, 64)
    finally:
        service.stop()


def test_keys_are_hashed_and_identified_in_constant_time_shape(tmp_path):
    key = new_api_key()
    line = hash_api_key(key, "alice").line()
    assert key not in line and line.startswith("alice sha256:")
    assert hash_api_key(key, "x").salt != hash_api_key(key, "x").salt  # per-key random salt
    (tmp_path / "keys.txt").write_text(f"# team keys\n{line}\n")
    store = KeyStore.load(tmp_path / "keys.txt", f"plain-env-key, {hash_api_key('k2', 'bob').line()}")
    assert [store.identify(k) for k in (key, "plain-env-key", "k2", "nope", None)] == ["alice", "env-0", "bob", None, None]
    from sd35fp8_helpers.constants import Settings

    env = Settings.from_env({"SD35FP8_API_KEYS": "plain-env-key"})
    assert env.api_keys == "plain-env-key" and "plain-env-key" not in repr(env)
    assert [bearer_token(h) for h in ("Bearer abc", "bearer abc", "Basic abc", "Bearer ", None)] == ["abc", "abc", None, None, None]


@pytest.mark.parametrize("line", ["alice sk-sd35fp8-plainkey", "alice md5:00:11", "a b c", "sha256:zz:" + "0" * 64])
def test_a_bad_keys_line_is_refused_without_echoing_it(line):
    with pytest.raises(Sd35fp8Error) as info:
        parse_key_line(line)
    assert "a line is not 'LABEL sha256:SALT:DIGEST' (line not shown: it may be a key)" in str(info.value)
    assert line not in str(info.value)


def test_token_bucket_allows_the_burst_then_says_when():
    limiter = RateLimiter(rate_per_min=6, burst=2)
    assert [limiter.retry_after("a") for _ in range(2)] == [0, 0]
    assert 9 <= limiter.retry_after("a") <= 10  # 6 a minute: one token every 10 s
    assert limiter.retry_after("b") == 0
    assert RateLimiter(0).retry_after("a") == 0  # --rate 0: off


def test_rate_limit_state_is_bounded():
    """Issue 12: one bucket per identity used to be kept forever — with --no-auth or JWTs identities are an open
    set. Now at most MAX_RATE_IDENTITIES are kept (least recently used go first), and an identity in use keeps
    its (empty) bucket however many others pass by."""
    limiter = RateLimiter(rate_per_min=6, burst=1)
    assert limiter.retry_after("hot") == 0 and limiter.retry_after("hot") > 0
    for i in range(MAX_RATE_IDENTITIES + 5000):
        assert limiter.retry_after(f"id-{i}") == 0  # every newcomer gets its burst
        if i % 1000 == 0:
            assert limiter.retry_after("hot") > 0, "an identity in use was forgotten"
    assert len(limiter._buckets) <= MAX_RATE_IDENTITIES
    small = RateLimiter(rate_per_min=6, burst=1, max_identities=3)
    for who in "abcdef":
        small.retry_after(who)
    assert list(small._buckets) == ["d", "e", "f"]


def test_api_key_command_writes_only_the_hash(capsys, tmp_path):
    keys = tmp_path / "keys.txt"
    assert main(["api-key", "--keys-file", str(keys), "--label", "ci"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-sd35fp8-") and key not in keys.read_text()
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    assert KeyStore.load(keys).identify(key) == "ci"


@pytest.mark.parametrize("args,message", [
    ([], "no API keys configured, so every request would be refused fix: sd35fp8 api-key --keys-file keys.txt"),
    (["--no-auth", "--queue-size", "0"], "--queue-size 0 must be >= 1"),
    (["--keys-file", "/nonexistent/keys.txt"], "keys file /nonexistent/keys.txt does not exist"),
    (["--no-auth", "--model", "/nonexistent/model"], "model '/nonexistent/model': is neither 'tiny', an existing folder"),
    (["--no-auth", "--memory-strategy", "turbo"], "strategy='turbo' is not a strategy"),
])
def test_serve_refuses_bad_options_in_one_line(capsys, args, message):
    """In-process ``main`` (the real CLI function); the subprocess path is the test below."""
    assert main(["serve", *args]) == 1
    assert message in capsys.readouterr().err


def test_serve_in_background_reports_a_server_that_exits(tmp_path):
    with pytest.raises(ServerStartFailed, match=r"exited with code 1 before it was ready: .*--queue-size 0 must be"):
        with serve_in_background("tiny", args=["--no-auth", "--queue-size", "0"], ready_timeout=120):
            pass


# --- logs (last: both servers have served everything above) --------------------------------------------------

def test_no_key_and_no_prompt_in_any_log_line(server, busy):
    for s in (server, busy):
        logs = s.logs()
        assert '"event": "generated"' in logs and '"request_id": ' in logs  # structured lines were written
        assert MARKER not in logs, "a prompt reached the logs"
        for name, key in KEYS.items():
            assert key not in logs, f"key {name!r} reached the logs"
        assert "Bearer" not in logs and "authorization" not in logs.lower()
