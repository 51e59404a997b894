"""Hub downloads against a local server that answers like the hub (tests/fake_hub.py), through the real client.

``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` at import, so every hub call runs in a
subprocess with its environment set: the CLI, or a small driver that prints each call's outcome as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import BAD_TOKEN, COMMIT, FakeHub, repo_files

from sd35fp8_helpers.errors import ModelNotFound, NotEnoughDisk
from sd35fp8_helpers.weights.hub import check_disk, known_sources, plan_download

REPO = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_sd35fp8FAKEtokenDoNotPrint1234567890"
BROKEN = "transformer/diffusion_pytorch_model.safetensors"

DRIVER = r"""
import json, sys
from sd35fp8_helpers.weights import hub
from sd35fp8_helpers.errors import Sd35fp8Error
out = []
for case in json.loads(sys.argv[1]):
    verb = hub.download if case.pop("download", False) else hub.plan_download
    try:
        out.append({"ok": str(verb(case.pop("repo"), **case))})
    except Sd35fp8Error as e:
        out.append({"type": type(e).__name__, "message": e.one_line})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub(tiny_model_dir):
    with FakeHub(repo_files(tiny_model_dir)) as server:
        yield server


def _env(hub_url: str, tmp_path: Path, token: str | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def _drive(cases: list[dict], env: dict[str, str]) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hub_refusals_become_one_line_errors(hub, tmp_path):
    url = hub.url
    token_fix = ("create a read token at https://huggingface.co/settings/tokens, then `hf auth login` or export "
                 "HF_TOKEN")
    anonymous = _drive([{"repo": "test/gated"}, {"repo": "test/private"}, {"repo": "test/tiny", "revision": "v9"},
                        {"repo": "test/tiny", "include": ["*.ckpt"]}], _env(url, tmp_path))
    assert anonymous == [
        {"type": "GatedRepo", "message": "test/gated: is gated: downloads need an account that accepted its "
                                         f"licence, and a token fix: accept the licence at {url}/test/gated, then "
                                         f"{token_fix}"},
        {"type": "RepoNotOnHub", "message": "test/private: not found on the hub (or private/gated, and no token is "
                                            f"set) fix: check the name (owner/name, case matters) at {url}/test/private; "
                                            f"if it is private or gated, {token_fix}"},
        {"type": "RepoNotOnHub", "message": "test/tiny: revision 'v9' not found fix: check --revision: a branch, "
                                            f"tag or commit listed at {url}/test/tiny/tree/main"},
        {"type": "RepoNotOnHub", "message": "test/tiny: no file matches --include *.ckpt fix: check the patterns "
                                            f"against the files listed at {url}/test/tiny/tree/main"},
    ]
    with_token = _drive([{"repo": "test/gated", "download": True, "local_dir": str(tmp_path / "gated")},
                         {"repo": "test/nope"}, {"repo": "test/forbidden"}], _env(url, tmp_path, FAKE_TOKEN))
    assert with_token == [
        {"type": "GatedRepo", "message": "test/gated: is gated and this token's account has not been granted access "
                                         f"fix: open {url}/test/gated logged in as that account, accept the licence, "
                                         "wait for approval, then retry"},
        {"type": "RepoNotOnHub", "message": "test/nope: not found on the hub (or private, and this token cannot see "
                                            f"it) fix: check the name (owner/name, case matters) at {url}/test/nope"},
        {"type": "HubAuthFailed", "message": "test/forbidden: the token is not allowed to read this repository (403) "
                                             "fix: for a fine-grained token, enable 'read access to public gated "
                                             "repos' (or to this repo) at https://huggingface.co/settings/tokens"},
    ]
    assert not (tmp_path / "gated").exists() and not (tmp_path / ".gated.partial" / BROKEN).exists()
    bad_token = _drive([{"repo": "test/tiny"}], _env(url, tmp_path, BAD_TOKEN))
    assert bad_token == [{"type": "HubAuthFailed", "message": "test/tiny: the hub rejected the token (401: invalid or "
                                                              f"expired) fix: {token_fix} (replacing the old one)"}]


def test_offline_and_unreachable(hub, tmp_path):
    offline = _drive([{"repo": "test/tiny"}], _env(hub.url, tmp_path, HF_HUB_OFFLINE="1"))
    assert offline == [{"type": "HubOffline", "message": "test/tiny: HF_HUB_OFFLINE=1 forbids network access fix: "
                                                         "unset HF_HUB_OFFLINE (or export HF_HUB_OFFLINE=0) on a "
                                                         "machine with network, or pass a local folder that holds "
                                                         "the model"}]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = _drive([{"repo": "test/tiny"}], _env(closed, tmp_path))
    assert unreachable == [{"type": "HubOffline", "message": f"test/tiny: cannot reach {closed} (ConnectError) fix: "
                                                             "check the network or proxy (HTTPS_PROXY) and "
                                                             "HF_ENDPOINT, then run the same command again: it "
                                                             "resumes; or pass a local folder that holds the model"}]


def test_disk_preflight_refuses_before_downloading(hub, tmp_path):
    with pytest.raises(NotEnoughDisk) as exc:
        check_disk(30 * 10**9, tmp_path, free_bytes=10 * 10**9)
    assert exc.value.one_line == (f"needs 30.00 GB, 10.00 GB free at {tmp_path} fix: free some space, or download "
                                  "elsewhere: --local-dir on a larger disk, or set HF_HUB_CACHE (or HF_HOME) to a "
                                  "folder on a larger, fast local disk")
    assert check_disk(1, tmp_path) > 1  # measured free space
    before = len(hub.requests)
    small = _drive([{"repo": "test/tiny", "download": True, "local_dir": str(tmp_path / "m"), "free_bytes": 1000}],
                   _env(hub.url, tmp_path))
    total = sum(len(b) for b in hub.repos["test/tiny"].values())
    assert small == [{"type": "NotEnoughDisk", "message": f"needs {total * 1.15 / 1e6:.1f} MB, 0.0 MB free at "
                                                          f"{tmp_path / 'm'} fix: free some space, or download "
                                                          "elsewhere: --local-dir on a larger disk, or set "
                                                          "HF_HUB_CACHE (or HF_HOME) to a folder on a larger, fast "
                                                          "local disk"}]
    assert not any("/resolve/" in path for _, path, _ in hub.requests[before:])  # no file was fetched
    assert not (tmp_path / "m").exists()


def test_nonexistent_fp8_repo_is_named_without_network():
    with pytest.raises(ModelNotFound, match="this repository does not exist"):
        plan_download("stabilityai/stable-diffusion-3.5-fp8")
    rows = {r["repo"]: r for r in known_sources()}
    assert rows["stabilityai/stable-diffusion-3.5-fp8"]["what"].startswith("DOES NOT EXIST")
    assert "sd3.5_large_fp8_scaled.safetensors (13.9 GiB)" in rows["Comfy-Org/stable-diffusion-3.5-fp8"]["what"]


def test_download_to_local_dir_is_verified(hub, tmp_path):
    dest = tmp_path / "tiny"
    out = _drive([{"repo": "test/tiny", "download": True, "local_dir": str(dest)}], _env(hub.url, tmp_path))
    assert out[0]["ok"].endswith(f"OK: {dest} is loadable (5 weight files, 356 tensors, 5 sha256 verified)")
    files = hub.repos["test/tiny"]
    assert all((dest / p).read_bytes() == data for p, data in files.items())
    manifest = (dest / "sha256sums.txt").read_text().splitlines()
    assert f"{hashlib.sha256(files[BROKEN]).hexdigest()}  {BROKEN}" in manifest and len(manifest) == 5
    assert not (tmp_path / ".tiny.partial").exists()


def test_failed_download_leaves_nothing_in_the_destination_then_resumes(hub, tmp_path, cli):
    dest = tmp_path / "tiny"
    env = _env(hub.url, tmp_path)
    result = cli("download", "test/broken", "--local-dir", str(dest), env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "sd35fp8 download: error: test/broken: the hub answered 500 (a server-side problem) fix: retry in a few "
        "minutes: finished files are kept and partial ones resume")
    assert not dest.exists()  # the destination never saw a file
    staging = tmp_path / ".tiny.partial"
    assert not (staging / BROKEN).exists()
    hub.broken_file = None  # the server recovers; the same command finishes the job
    try:
        start = len(hub.requests)
        result = cli("download", "test/broken", "--local-dir", str(dest), env=env)
    finally:
        hub.broken_file = BROKEN
    assert result.returncode == 0, result.stderr
    fetched = [path for method, path, _ in hub.requests[start:] if method == "GET" and "/resolve/" in path]
    assert fetched == [f"/test/broken/resolve/{COMMIT}/{BROKEN}"]  # finished files were not fetched again
    assert (dest / BROKEN).read_bytes() == hub.repos["test/broken"][BROKEN] and not staging.exists()


def test_offline_uses_a_complete_cached_snapshot(hub, tmp_path):
    online = _drive([{"repo": "test/tiny", "download": True}], _env(hub.url, tmp_path))
    snapshot = tmp_path / "hf/hub/models--test--tiny/snapshots" / COMMIT
    assert online[0]["ok"].startswith(f"{snapshot} in ")
    offline = _drive([{"repo": "test/tiny", "download": True}, {"repo": "test/gated", "download": True}],
                     _env(hub.url, tmp_path, HF_HUB_OFFLINE="1"))
    assert offline[0]["ok"] == (f"{snapshot} from the cache (hub unreachable); OK: {snapshot} is loadable "
                                "(5 weight files, 356 tensors, 0 sha256 verified)")
    assert offline[1]["type"] == "HubOffline"  # never downloaded: the offline error, not a cache error


def test_failed_cache_download_leaves_no_partial_file_in_the_snapshot(hub, tmp_path):
    env = _env(hub.url, tmp_path)
    out = _drive([{"repo": "test/broken", "download": True}], env)
    assert out[0]["type"] == "HubOffline"
    snapshot = tmp_path / "hf/hub/models--test--broken/snapshots" / COMMIT
    files = hub.repos["test/broken"]
    present = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert BROKEN not in present and present  # the others arrived; the failed one is not in the snapshot
    assert all((snapshot / p).read_bytes() == files[p] for p in present)


@pytest.mark.slow  # four CLI runs and notebooks 00 + 01
def test_token_never_appears_in_output_logs_or_notebooks(hub, tmp_path, cli):
    env = _env(hub.url, tmp_path, FAKE_TOKEN)
    model = tmp_path / "tiny"
    runs = [cli("doctor", env=env),
            cli("download", "test/tiny", "--local-dir", str(model), env=env),
            cli("verify", str(model), env=env),
            cli("download", "test/gated", env=env)]
    assert [r.returncode for r in runs[1:]] == [0, 0, 1]
    assert runs[1].stdout.startswith(f"plan: test/tiny@{COMMIT[:10]}: 19 files, ")
    assert runs[1].stdout.strip().endswith(f"OK: {model} is loadable (5 weight files, 356 tensors, 5 sha256 verified)")
    assert any(had_token for _, _, had_token in hub.requests)  # the token was really sent to the server
    out = tmp_path / "nb"
    runs.append(cli("notebooks", "--only", "00", "01", "--out", str(out),
                    env={**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": ""}, timeout=600))
    assert runs[-1].returncode == 0, runs[-1].stdout + runs[-1].stderr
    for run in runs:
        assert FAKE_TOKEN not in run.stdout + run.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"00_environment_check.ipynb", "01_download_weights.ipynb", "summary.json"}
    for path in written + [p for p in tmp_path.rglob("*.log") if p.is_file()]:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path
