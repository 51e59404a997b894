"""The Redis job queue end to end (issue 14): a real ``redis-server``, real ``sd35fp8 worker`` processes
(Celery, the tiny model on CPU), real ``sd35fp8 serve --broker`` processes over HTTP on 127.0.0.1.

One cluster per module (started in parallel, stopped however the module ends): Redis with persistence on, two
workers (``w1``, ``w2``; 1 torch thread each, 2 s leases, 4 s visibility timeout so a crash is recovered in
seconds), and three API processes — ``main`` (keys for 8 clients, JWT HS256, generous rate) and ``b``/``c``
(4 requests a minute, 2 jobs in flight per key, results kept 2 s) that share their limits through Redis.
The fault tests run last: Redis killed and restarted, then a worker killed with ``kill -9``. The very last
test reads every log and checks that no key, token, secret or prompt is in any of them.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sd35fp8_helpers.pipeline.generation import GenerationSettings, read_png_metadata
from sd35fp8_helpers.serving.auth import new_api_key
from sd35fp8_helpers.serving.client import decode_images, free_port, start_server, start_worker, wait_for_workers
from sd35fp8_helpers.serving.jobstore import JobStore
from sd35fp8_helpers.serving.jwt_auth import JwtConfig, JwtVerifier, TokenRejected, make_jwt
from sd35fp8_helpers.serving.redis_server import start_redis

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (sudo apt-get install -y redis-server)")

REPO = Path(__file__).resolve().parent.parent
IMAGES, JOBS = "/v1/images/generations", "/v1/images/jobs"
MARKER = "okapi-41c9"  # in every prompt sent; must never reach a log line
CLIENTS = [f"client{i}" for i in range(8)]
KEYS = {name: new_api_key() for name in [*CLIENTS, "main", "rate", "cap", "ttl"]}
JWT_SECRET = "jwt-secret-" + "q7" * 20
WORKER_ARGS = ["--threads", "1", "--lease", "2", "--visibility-timeout", "4"]
SMALL = {"size": "64x64", "steps": 2}
SLOW = {"size": "128x128", "steps": 100}  # ~1-3 s on one CPU thread: long enough to act on mid-job


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def _prompt(text: str = "a red fox") -> str:
    return f"{text} {MARKER}"


def _wait_for(predicate, timeout: float = 60.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not true after {timeout} s: {predicate}")


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = start_redis(tmp / "redis")
        self.store = JobStore(self.redis.url)
        self.metrics_ports = {"w1": free_port(), "w2": free_port()}
        secret_file = tmp / "jwt.secret"
        secret_file.write_text(JWT_SECRET)
        self.workers = {name: start_worker(self.redis.url, "tiny", name=name, wait=False,
                                           args=[*WORKER_ARGS, "--metrics-port", str(port)],
                                           env={"OMP_NUM_THREADS": "1"})
                        for name, port in self.metrics_ports.items()}
        api = {"main": (["--rate", "6000", "--burst", "1000", "--result-ttl", "300", "--max-in-flight", "8",
                         "--jwt-secret-file", str(secret_file)], [*CLIENTS, "main"]),
               "b": (["--rate", "4", "--max-in-flight", "2", "--result-ttl", "2"], ["rate", "cap", "ttl"]),
               "c": (["--rate", "4", "--max-in-flight", "2", "--result-ttl", "2", "--timeout", "1"],
                     ["rate", "cap", "ttl"])}
        with ThreadPoolExecutor(len(api)) as pool:  # each waits for /readyz: Redis up and a worker alive
            futures = {name: pool.submit(start_server, "tiny", args=["--broker", self.redis.url, *args],
                                         api_keys={k: KEYS[k] for k in keys}) for name, (args, keys) in api.items()}
            self.api = {name: f.result() for name, f in futures.items()}
        wait_for_workers(self.redis.url, list(self.workers.values()))

    def url(self, name: str = "main") -> str:
        return self.api[name].url

    def stop(self) -> None:
        for s in self.api.values():
            s.stop()
        for w in self.workers.values():
            w.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):  # the tiny model is built once, before the workers load it
    c = Cluster(tmp_path_factory.mktemp("queue"))
    try:
        yield c
    finally:
        c.stop()


def _submit(url: str, key: str, body: dict) -> str:
    r = httpx.post(f"{url}{JOBS}", headers=_auth(key), json=body, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"{JOBS}/{r.json()['id']}" and r.json()["status"] == "queued"
    return r.json()["id"]


def _job(url: str, key: str, job_id: str) -> dict:
    r = httpx.get(f"{url}{JOBS}/{job_id}", headers=_auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _until_final(url: str, key: str, job_id: str, timeout: float = 90) -> dict:
    return _wait_for(lambda: (b := _job(url, key, job_id))["status"] in ("done", "failed", "cancelled") and b,
                     timeout, every=0.1)


# --- the job store's rules, straight on Redis ---------------------------------------------------------------

def test_a_job_is_done_once_whatever_the_deliveries(cluster):
    """Claims and leases: a second delivery while the first worker lives is 'busy'; after its lease ran out a
    new worker takes over and the first one's late result is refused; an ended job is never run again."""
    s = cluster.store
    assert s.create("unit-1", [{"prompt": "x", "steps": 1}], identity="unit") == "ok"
    assert s.create("unit-1", [{"prompt": "x", "steps": 1}], identity="unit") == "exists"
    assert s.claim("unit-1", "a", lease_s=0.3) == "run"
    assert s.claim("unit-1", "b", lease_s=0.3) == "busy"
    time.sleep(0.4)  # a's lease runs out (a died, or stalled)
    assert s.claim("unit-1", "b", lease_s=5) == "run"
    assert s.finish("unit-1", "done", "a", images=[b"late"]) == "lost_lease"
    assert s.finish("unit-1", "done", "b", images=[b"png"], run_s=0.1) == "ok"
    assert s.finish("unit-1", "done", "b", images=[b"again"]) == "already:done"
    assert s.claim("unit-1", "c", lease_s=5) == "done"
    record = s.get("unit-1")
    assert (record.state, record.worker, record.attempts, record.completions) == ("done", "b", 2, 1)
    assert s.results("unit-1") == [b"png"]
    assert s.create("unit-2", [{"prompt": "x"}], identity="unit", max_in_flight=1) == "ok"
    assert s.create("unit-3", [{"prompt": "x"}], identity="unit", max_in_flight=1) == "key_busy"
    assert s.cancel("unit-2", "test") == "cancelled" and s.claim("unit-2", "a", 5) == "cancelled"
    assert s.create("unit-3", [{"prompt": "x"}], identity="unit", max_in_flight=1) == "ok"  # the slot is free
    s.cancel("unit-3", "test")


# --- 40 jobs, 8 clients, 2 workers --------------------------------------------------------------------------

def test_forty_jobs_from_eight_clients_over_two_workers(cluster, tiny_pipe):
    """Clients 0-3 use OpenAI's synchronous endpoint, 4-7 the jobs API. All 40 done, both workers used, every
    job done once, and each image has the same pixels as the in-process engine for the same settings."""
    def client(i: int) -> list[tuple[str, dict, object]]:
        out = []
        with httpx.Client(timeout=120) as http:
            for j in range(5):
                body = {"prompt": _prompt(f"scene {i}-{j}"), "seed": 100 * i + j, **SMALL}
                if i < 4:
                    r = http.post(f"{cluster.url()}{IMAGES}", headers=_auth(CLIENTS[i]), json=body)
                    assert r.status_code == 200, r.text
                    out.append((r.headers["x-job-id"], body, decode_images(r.json())[0]))
                else:
                    job_id = _submit(cluster.url(), CLIENTS[i], body)
                    done = _until_final(cluster.url(), CLIENTS[i], job_id)
                    assert done["status"] == "done" and done["progress"]["step"] == body["steps"], done
                    out.append((job_id, body, decode_images(done)[0]))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        results = [r for rs in pool.map(client, range(len(CLIENTS))) for r in rs]
    wall = time.perf_counter() - start
    records = cluster.store.get_many([job_id for job_id, _, _ in results])
    assert len(results) == 40 and all(r.state == "done" and r.completions == 1 for r in records.values())
    used = {r.worker for r in records.values()}
    assert used == {"w1", "w2"}, f"workers used: {used}"
    import torch

    from sd35fp8_helpers.serving.engine import ImageEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: CPU float sums depend on the thread count
    try:
        engine = ImageEngine("tiny", pipe=tiny_pipe)
        for job_id, body, image in results:
            settings = GenerationSettings(body["prompt"], seed=body["seed"], steps=2, height=64, width=64,
                                          guidance_scale=engine.default_guidance())
            reference = engine.render([settings])[0].image
            assert image.tobytes() == reference.tobytes(), f"job {job_id}: pixels differ from the in-process path"
    finally:
        torch.set_num_threads(threads)
    print(f"\n40 jobs, 8 clients, 2 workers: {wall:.1f} s; per worker: "
          f"{ {w: sum(r.worker == w for r in records.values()) for w in used} }")


# --- cancel ---------------------------------------------------------------------------------------------------

def test_delete_cancels_a_queued_job_at_once_and_a_running_one_at_the_next_step(cluster):
    url, key = cluster.url(), "main"
    running = [_submit(url, key, {"prompt": _prompt("long"), **SLOW}) for _ in range(2)]  # both workers busy
    queued = _submit(url, key, {"prompt": _prompt("never runs"), **SLOW})
    _wait_for(lambda: all(_job(url, key, j)["status"] == "running" for j in running))
    r = httpx.delete(f"{url}{JOBS}/{queued}", headers=_auth(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    victim = running[0]
    _wait_for(lambda: _job(url, key, victim)["progress"]["step"] >= 3)
    r = httpx.delete(f"{url}{JOBS}/{victim}", headers=_auth(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    httpx.delete(f"{url}{JOBS}/{running[1]}", headers=_auth(key))
    final = _until_final(url, key, victim)
    asked, stopped = final["progress"]["cancel_asked_at_step"], final["progress"]["step"]
    assert final["status"] == "cancelled" and final["error"]["code"] == "cancelled"
    assert 3 <= asked <= stopped <= asked + 1 < SLOW["steps"], (asked, stopped)  # at the next step
    assert _until_final(url, key, queued)["status"] == "cancelled" and cluster.store.get(queued).attempts == 0
    assert _until_final(url, key, running[1])["status"] == "cancelled"
    events = [e for w in cluster.workers.values() for e in w.log_events()]
    assert any(e.get("event") == "job_cancelled" and e.get("job_id") == victim for e in events)
    assert not any(e.get("job_id") == queued and e.get("event") == "job_started" for e in events)
    done = _submit(url, key, {"prompt": _prompt(), **SMALL})
    assert _until_final(url, key, done)["status"] == "done"
    again = httpx.delete(f"{url}{JOBS}/{done}", headers=_auth(key))
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    other = httpx.get(f"{url}{JOBS}/{done}", headers=_auth("client0"))  # someone else's job: 404, no hint
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    assert httpx.get(f"{url}{JOBS}/no-such-job", headers=_auth(key)).status_code == 404


def test_a_client_that_disconnects_has_its_queued_job_cancelled(cluster):
    body = json.dumps({"prompt": _prompt("nobody waits"), **SLOW})
    rid = f"gone-{time.monotonic_ns()}"
    host, port = cluster.url().removeprefix("http://").split(":")

    def mine():
        for job_id in cluster.store.redis.smembers("sd35fp8:running"):
            record = cluster.store.get(job_id.decode())
            if record and record.request_id == rid and record.step >= 2:
                return record.id
        return None

    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {IMAGES} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['main']}\r\nX-Request-ID: "
                     f"{rid}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        job_id = _wait_for(mine)
    record = _wait_for(lambda: (r := cluster.store.get(job_id)).final and r, 30)
    assert (record.state, record.cancel_reason) == ("cancelled", "client_disconnected")
    assert record.step < SLOW["steps"] and not cluster.store.results(job_id)


# --- admission: bad input, rate limits, caps, TTL, JWT ---------------------------------------------------------

BAD = [
    ('{"prompt": "x", "seed": 18446744073709551615, "n": 2}', "seed"),
    ('{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
    ('{"prompt": "x", "steps": true}', "steps"),
    ('{"prompt": "x", "steps": 5000}', "steps"),
    ('{"prompt": "x", "n": 9}', "n"),
    ('{"prompt": "x", "size": "100x100"}', "size"),
    ('{"prompt": "x", "model": "dall-e-3"}', "model"),
    ('{"prompt": ""}', "prompt"),
    ('{"prompt": "x", "quality": "hd"}', "quality"),
]


@pytest.mark.parametrize("route", [IMAGES, JOBS])
def test_bad_input_is_refused_before_anything_is_enqueued(cluster, route):
    keys_before = set(cluster.store.redis.scan_iter("sd35fp8:job:*"))
    for raw, param in BAD:
        r = httpx.post(f"{cluster.url()}{route}", content=raw.encode(), timeout=30,
                       headers={**_auth("main"), "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (raw, r.text)
    big = httpx.post(f"{cluster.url()}{route}", content=b" " * 70_000, timeout=30,
                     headers={**_auth("main"), "Content-Type": "application/json"})
    assert big.status_code == 413
    assert set(cluster.store.redis.scan_iter("sd35fp8:job:*")) == keys_before, "a bad request created a job"


def test_rate_limit_is_shared_by_two_api_processes(cluster):
    """Burst 4 for key 'rate' on b and c together: two requests to each, then both say 429."""
    for name in ("b", "c", "b", "c"):  # bad JSON: cheap, and still takes a token
        assert httpx.post(f"{cluster.url(name)}{JOBS}", headers=_auth("rate"), content=b"{").status_code == 400
    for name in ("b", "c"):
        r = httpx.post(f"{cluster.url(name)}{JOBS}", headers=_auth("rate"), json={"prompt": _prompt()})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["retry-after"]) <= 15
    ttl = cluster.store.redis.pttl("sd35fp8:rl:rate")
    assert 0 < ttl <= 61_000, "a bucket expires once full again: Redis holds no rate state forever"


def test_per_key_in_flight_cap_is_shared_through_redis(cluster):
    first = [_submit(cluster.url("b"), "cap", {"prompt": _prompt("cap"), **SLOW}) for _ in range(2)]
    r = httpx.post(f"{cluster.url('c')}{JOBS}", headers=_auth("cap"), json={"prompt": _prompt(), **SMALL})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_in_flight", r.text
    assert "this key already has 2 jobs queued or running" in r.json()["error"]["message"]
    for job_id in first:
        assert httpx.delete(f"{cluster.url('c')}{JOBS}/{job_id}", headers=_auth("cap")).status_code == 200
    for job_id in first:
        assert _until_final(cluster.url("b"), "cap", job_id)["status"] == "cancelled"


def test_results_expire_after_the_ttl(cluster):
    job_id = _submit(cluster.url("b"), "ttl", {"prompt": _prompt("short-lived"), **SMALL})
    done = _until_final(cluster.url("c"), "ttl", job_id)  # any API process answers for any job
    assert done["status"] == "done" and len(done["data"]) == 1
    assert cluster.store.redis.ttl(f"sd35fp8:result:{job_id}") <= 2
    time.sleep(2.5)
    r = httpx.get(f"{cluster.url('b')}{JOBS}/{job_id}", headers=_auth("ttl"))
    assert r.status_code == 404 and "finished jobs are kept 2 s" in r.json()["error"]["message"]
    assert cluster.store.redis.exists(f"sd35fp8:job:{job_id}", f"sd35fp8:result:{job_id}") == 0


def test_a_synchronous_request_past_its_timeout_is_a_504_and_its_job_is_cancelled(cluster):
    r = httpx.post(f"{cluster.url('c')}{IMAGES}", headers=_auth("ttl"), timeout=30,  # c: --timeout 1
                   # 4 images × 100 steps at the tiny model's 256² limit: ~4 s on 2 idle cores (one image took
                   # 0.97 s, which raced the 1 s deadline on an idle CI machine and sometimes finished first)
                   json={"prompt": _prompt("too slow"), "size": "256x256", "steps": 100, "n": 4})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    job_id = re.search(r"\(job (\w+)\)", r.json()["error"]["message"])[1]
    record = _wait_for(lambda: (rec := cluster.store.get(job_id)).final and rec, 30)
    assert (record.state, record.cancel_reason) == ("cancelled", "deadline") and record.step < 100


def test_jwt_bearer_tokens(cluster):
    url = cluster.url()

    def post(token: str) -> httpx.Response:
        return httpx.post(f"{url}{JOBS}", headers={"Authorization": f"Bearer {token}"}, timeout=30,
                          json={"prompt": _prompt("jwt"), **SMALL})

    valid = post(make_jwt("alice", secret=JWT_SECRET, expires_in=60))
    assert valid.status_code == 202, valid.text
    assert cluster.store.get(valid.json()["id"]).identity == "jwt:alice"  # the rate-limit identity
    cases = {
        "expired": (make_jwt("alice", secret=JWT_SECRET, expires_in=-120), "the JWT has expired"),
        "wrong signature": (make_jwt("alice", secret="another-secret-" + "x" * 30), "signature does not verify"),
        "missing sub": (make_jwt(None, secret=JWT_SECRET), "the JWT has no 'sub' claim"),
        "missing exp": (make_jwt("alice", secret=JWT_SECRET, expires_in=None), "the JWT has no 'exp' claim"),
        "alg none": ("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.",
                     "is not signed with HS256"),
    }
    for name, (token, message) in cases.items():
        r = post(token)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token", (name, r.text)
        assert message in r.json()["error"]["message"] and token not in r.text, name
    assert post("sk-sd35fp8-not-a-key").json()["error"]["code"] == "invalid_api_key"
    other = httpx.get(f"{url}{JOBS}/{valid.json()['id']}", headers=_auth("main"))
    assert other.status_code == 404  # the job belongs to jwt:alice, not to a key


def test_rs256_tokens_and_weak_secrets():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    verifier = JwtVerifier(JwtConfig(public_key=public, audience="images"))
    assert verifier.identify(make_jwt("bob", private_key=private, aud="images")) == "jwt:bob"
    with pytest.raises(TokenRejected, match="'aud' is not 'images'"):
        verifier.identify(make_jwt("bob", private_key=private, aud="other"))
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    # the algorithm-confusion attack: HS256 "signed" with the server's public key (PyJWT itself refuses to make it)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing = header + "." + b64(json.dumps({"sub": "eve", "exp": 4102444800}).encode())
    forged = f"{signing}.{b64(hmac.new(public.encode(), signing.encode(), hashlib.sha256).digest())}"
    with pytest.raises(TokenRejected, match="not signed with RS256"):
        verifier.identify(forged)
    with pytest.raises(Exception, match="shorter than 32 bytes"):
        JwtConfig(secret="short")


# --- CLI refusals (no cluster needed) ------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["worker", "--broker", "redis://127.0.0.1:1/0", "--model", "tiny"], "the job queue at redis://127.0.0.1:1/0 "
                                                                         "cannot be reached"),
    (["worker", "--broker", "redis://127.0.0.1:1/0", "--gpus", "all"], "--gpus all: no CUDA GPU is visible"),
    (["worker", "--broker", "redis://127.0.0.1:1/0", "--lease", "30", "--visibility-timeout", "10"],
     "--visibility-timeout 10 must be longer than --lease 30"),
    (["worker", "--model", "tiny"], "no job queue given fix: pass --broker redis://HOST:PORT/0"),
    (["serve", "--no-auth", "--broker", "redis://:hunter2@127.0.0.1:1/0"], "the job queue at redis://***@127.0.0.1:1/0"),
])
def test_queue_commands_fail_in_one_line(cli, argv, message):
    """Real subprocesses (a worker configures process-wide logging, which must not leak into this one)."""
    start = time.monotonic()
    result = cli(*argv, timeout=60)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "hunter2" not in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - start < 30, "an unreachable Redis must not make a command hang"


def test_batch_without_a_worker_says_so(tmp_path):
    with start_redis(tmp_path / "r", persistence=False) as redis:
        (tmp_path / "p.txt").write_text("a fox\n")
        with pytest.raises(Exception, match="no worker has started on the queue"):
            from sd35fp8_helpers.serving.batch import run_batch

            run_batch(tmp_path / "p.txt", redis.url, tmp_path / "out", progress=False)


# --- observability --------------------------------------------------------------------------------------------

def _series_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\w+)", line)
        if m:
            names.add(m[1])
            if m[2] == "counter":
                names.add(m[1] + "_total")
            if m[2] == "histogram":
                names |= {m[1] + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_every_dashboard_query_names_an_exported_metric(cluster):
    from sd35fp8_helpers.serving.metrics import GPU_ONLY_SERIES

    exported = _series_names(httpx.get(f"{cluster.url()}/metrics").text)
    for port in cluster.metrics_ports.values():
        exported |= _series_names(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
    dashboard = json.loads((REPO / "deploy/grafana/sd35fp8-dashboard.json").read_text())
    queried = {}
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:sd35fp8|process)_[a-z0-9_]+)\b", target["expr"]))
            assert names, f"{panel['title']!r}: {target['expr']!r} names no metric"
            queried.update({n: panel["title"] for n in names})
    source = "".join(p.read_text() for p in (REPO / "sd35fp8_helpers/serving").glob("*.py"))
    missing = {n: t for n, t in queried.items()
               if n not in exported and not (n in GPU_ONLY_SERIES and f'"{n}"' in source)}
    assert not missing, f"dashboard queries series nobody exports: {missing}"
    assert {"sd35fp8_queue_depth", "sd35fp8_worker_busy_seconds_total", "sd35fp8_job_queue_wait_seconds_bucket",
            "sd35fp8_job_run_seconds_bucket", "sd35fp8_queue_jobs"} <= set(queried)


def test_cluster_metrics_count_what_the_workers_did(cluster):
    text = httpx.get(f"{cluster.url('b')}/metrics").text  # any API process shows every worker
    values = {m[1]: float(m[2]) for m in re.finditer(r"^(sd35fp8_\S+) (\S+)$", text, re.M)}
    stats = cluster.store.worker_stats()
    for worker in ("w1", "w2"):
        assert values[f'sd35fp8_worker_images_total{{worker="{worker}"}}'] == stats[worker]["images"] > 0
        assert values[f'sd35fp8_worker_busy_seconds_total{{worker="{worker}"}}'] > 0
    assert values["sd35fp8_queue_up"] == 1 and values["sd35fp8_workers_alive"] == 2
    assert values["sd35fp8_job_run_seconds_count"] == sum(s["jobs"] for s in stats.values())


# --- batch ------------------------------------------------------------------------------------------------------

def _batch(cluster, prompts: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd35fp8_helpers.cli", "batch", str(prompts), "--broker",
                           cluster.redis.url, "--out", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=300)


def test_batch_writes_pngs_and_a_manifest_and_a_rerun_skips_what_is_done(cluster, tmp_path):
    lines = [json.dumps({"prompt": _prompt(f"batch {i}"), "seed": i, **SMALL}) for i in range(6)]
    lines += [json.dumps({"prompt": _prompt("bad"), "steps": 0}), json.dumps({"prompt": "x", "colour": "red"})]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    first = _batch(cluster, prompts, tmp_path / "out")
    assert first.returncode == 1, first.stderr  # two bad lines, reported; the six others ran
    assert "line 7: steps=0 must be a whole number from 1" in first.stderr
    assert "line 8: unknown field(s) colour" in first.stderr
    assert "6 done, 0 already done (skipped), 2 failed" in first.stdout
    rows = [json.loads(x) for x in (tmp_path / "out/manifest.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6] and len({r["job_id"] for r in rows}) == 6
    import hashlib

    for r in rows:
        png = (tmp_path / "out" / r["file"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() == r["sha256"] and r["worker"] in ("w1", "w2")
        meta = read_png_metadata(tmp_path / "out" / r["file"])
        assert meta["settings"]["seed"] == r["seed"] == r["line"] - 1 and meta["model"] == "tiny"
    jobs_before = set(cluster.store.redis.scan_iter("sd35fp8:job:*"))
    again = _batch(cluster, prompts, tmp_path / "out")
    assert "0 done, 6 already done (skipped), 2 failed" in again.stdout, again.stdout + again.stderr
    assert set(cluster.store.redis.scan_iter("sd35fp8:job:*")) == jobs_before  # nothing enqueued
    assert len((tmp_path / "out/manifest.jsonl").read_text().splitlines()) == 6


# --- faults (last: they stop Redis, then a worker) ------------------------------------------------------------

def test_jobs_waiting_survive_a_redis_restart_and_the_api_says_503_meanwhile(cluster):
    url, key = cluster.url(), "main"
    ids = [_submit(url, key, {"prompt": _prompt(f"wait {i}"), "size": "64x64", "steps": 60, "seed": i})
           for i in range(6)]  # two run, four wait
    _wait_for(lambda: sum(_job(url, key, j)["status"] == "running" for j in ids) >= 1)
    cluster.redis.stop(kill=True)  # a crash: no save on exit; the append-only file (fsync always) is all there is
    try:
        for method, path in (("POST", JOBS), ("POST", IMAGES), ("GET", f"{JOBS}/{ids[-1]}")):
            start = time.monotonic()
            r = httpx.request(method, f"{url}{path}", headers=_auth(key), timeout=30,
                              json={"prompt": _prompt(), **SMALL} if method == "POST" else None)
            assert time.monotonic() - start < 5, f"{method} {path} took {time.monotonic() - start:.1f} s"
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable", r.text
            assert "cannot be reached" in r.json()["error"]["message"] and r.headers["retry-after"] == "5"
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert "sd35fp8_queue_up 0.0" in httpx.get(f"{url}/metrics").text
    finally:
        cluster.redis.start()
    records = [_until_final(url, key, j, timeout=90) for j in ids]
    assert [r["status"] for r in records] == ["done"] * 6
    assert all(cluster.store.get(j).completions == 1 for j in ids)
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_worker_killed_mid_job_loses_nothing_and_nothing_is_done_twice(cluster, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{_prompt('kill')} {i}\n" for i in range(6)))
    batch = subprocess.Popen([sys.executable, "-m", "sd35fp8_helpers.cli", "batch", str(prompts), "--broker",
                              cluster.redis.url, "--out", str(tmp_path / "out"), "--steps", "100", "--size",
                              "128x128", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def victim_job():
        for raw in cluster.store.redis.smembers("sd35fp8:running"):
            record = cluster.store.get(raw.decode())
            if record and record.source == "batch" and record.worker == "w2" and record.step >= 3:
                return record.id
        return None

    killed = _wait_for(victim_job, 120)
    cluster.workers["w2"].kill()  # kill -9, mid-job
    out, err = batch.communicate(timeout=180)
    assert batch.returncode == 0, err
    rows = [json.loads(x) for x in (tmp_path / "out/manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["job_id"] for r in rows}) == 6, "a job lost or written twice"
    redone = next(r for r in rows if r["job_id"] == killed)
    assert redone["worker"] == "w1" and redone["attempts"] == 2, redone
    assert all(cluster.store.get(r["job_id"]).completions == 1 for r in rows)
    done_events = [e["job_id"] for w in cluster.workers.values() for e in w.log_events() if e.get("event") == "job_done"]
    assert all(done_events.count(r["job_id"]) == 1 for r in rows), "a job was generated to the end twice"
    print(f"\nkill -9 w2 during {killed}: re-delivered to w1 (attempt 2); 6/6 jobs in the manifest once each")


# --- logs (last) --------------------------------------------------------------------------------------------------

def test_no_key_token_secret_or_prompt_in_any_log(cluster):
    logs = {name: s.logs() for name, s in cluster.api.items()}
    logs |= {name: w.logs() for name, w in cluster.workers.items()}
    for name, text in logs.items():
        assert '"event": ' in text, f"{name} wrote no structured log"
        assert MARKER not in text, f"a prompt reached the log of {name}"
        assert JWT_SECRET not in text and "eyJ" not in text, f"a JWT or its secret reached the log of {name}"
        for label, key in KEYS.items():
            assert key not in text, f"key {label!r} reached the log of {name}"
        assert "Bearer" not in text and "authorization" not in text.lower()
    assert any('"key": "jwt:alice"' in t for t in logs.values())  # identities are logged, tokens never
