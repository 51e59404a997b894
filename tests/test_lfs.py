"""Git LFS: a real LFS repository (git-lfs over file://, no server) cloned with and without smudge."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from sd35fp8_helpers.errors import GitCommandFailed, GitLfsMissing
from sd35fp8_helpers.weights import lfs
from sd35fp8_helpers.weights.verify import verify_model

WEIGHTS = ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "text_encoder_3/model.safetensors",
           "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
OID = "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393"


@pytest.fixture(scope="module")
def origin(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model committed to a git repository with its weights in Git LFS (like a hub repo)."""
    return lfs.init_lfs_repo(tiny_model_dir, tmp_path_factory.mktemp("lfs") / "origin")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- pointer parsing ----------------------------------------------------------------------------------

def test_parse_pointer_accepts_what_git_lfs_writes():
    text = f"version https://git-lfs.github.com/spec/v1\noid sha256:{OID}\nsize 12345\n"
    assert lfs.parse_pointer(text.encode()) == lfs.LfsPointer(OID, 12345)
    assert lfs.format_pointer(OID, 12345) == text
    assert lfs.parse_pointer(text.replace("\n", "\r\n").encode()).size == 12345  # CRLF checkout on Windows
    assert lfs.parse_pointer(text.rstrip("\n").encode()).size == 12345  # no final newline
    assert lfs.parse_pointer((text + "ext-0-foo sha256:" + "1" * 64 + "\n").encode()).oid == OID


@pytest.mark.parametrize("data", [
    b"",
    b"\x10\x00\x00\x00\x00\x00\x00\x00{}",                                    # a safetensors file
    f"version https://example.com/spec\noid sha256:{OID}\nsize 1\n".encode(),  # unknown spec
    b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n",   # oid not 64 hex
    f"version https://git-lfs.github.com/spec/v1\noid sha256:{OID}\nsize -1\n".encode(),
    f"version https://git-lfs.github.com/spec/v1\noid sha256:{OID}\n".encode(),  # no size
    f"version https://git-lfs.github.com/spec/v1\noid sha256:{OID}\nsize 1\n".encode() + b"x" * 1100,  # > 1024 B
])
def test_parse_pointer_rejects_non_pointers(data):
    assert lfs.parse_pointer(data) is None


def test_sha256_file_streams_with_a_progress_bar(tmp_path, capsys):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(3 * 2**20 + 5))
    assert lfs.sha256_file(f, progress=True) == _sha(f)
    assert "sha256 blob" in capsys.readouterr().err


# --- the real git-lfs ---------------------------------------------------------------------------------

def test_clone_without_smudge_gives_pointers_and_pull_fetches_them(origin, tmp_path):
    clone = lfs.clone(origin.as_uri(), tmp_path / "clone", skip_smudge=True)
    pointers = lfs.find_pointers(clone)
    assert [p.path.relative_to(clone).as_posix() for p in pointers] == WEIGHTS
    for p in pointers:  # each pointer names the real file's size and sha256
        real = origin / p.path.relative_to(clone)
        assert (p.pointer.size, p.pointer.oid) == (real.stat().st_size, _sha(real))
        assert p.pointer_bytes < 200
    assert [(f.path, f.checked_out) for f in lfs.ls_files(clone)] == [(w, False) for w in WEIGHTS]

    files = lfs.pull(clone, include=["vae/*"])  # only what is asked for
    assert [f.path for f in files if f.checked_out] == ["vae/diffusion_pytorch_model.safetensors"]
    assert len(lfs.find_pointers(clone)) == 4

    files = lfs.pull(clone)
    assert lfs.find_pointers(clone) == []
    for f in files:  # sha256 of every pulled file equals its oid
        assert f.checked_out and lfs.sha256_file(clone / f.path) == f.oid
    report = verify_model(clone)
    assert report.ok and report.hashed == 5, report.to_text()


def test_clone_with_smudge_gives_the_weights(origin, tmp_path):
    clone = lfs.clone(str(origin), tmp_path / "clone", skip_smudge=False)
    assert lfs.find_pointers(clone) == []
    assert all(_sha(clone / w) == _sha(origin / w) for w in WEIGHTS)


def test_failed_pull_leaves_pointers_not_half_written_files(origin, tmp_path):
    broken = tmp_path / "origin"
    shutil.copytree(origin, broken)
    clone = lfs.clone(broken.as_uri(), tmp_path / "clone")
    oid = lfs.read_pointer(clone / WEIGHTS[3]).oid
    obj = broken / ".git/lfs/objects" / oid[:2] / oid[2:4] / oid
    data = obj.read_bytes()
    obj.unlink()  # the remote lost half of the object (unlink first: the file may be a hard link)
    obj.write_bytes(data[: len(data) // 2])
    with pytest.raises(GitCommandFailed) as exc:
        lfs.pull(clone)
    assert exc.value.one_line == (
        f"`git lfs pull` failed (exit 2): Failed to fetch some objects from '{broken.as_uri()}' "
        "fix: check the remote (git -C " + str(clone) + " remote -v) and your access to it, then run "
        "`git lfs pull` again: finished objects are kept, so it resumes")
    assert lfs.read_pointer(clone / WEIGHTS[3]).oid == oid  # still the pointer, byte for byte
    assert [p.path.relative_to(clone).as_posix() for p in lfs.find_pointers(clone)] == [WEIGHTS[3]]
    assert all(_sha(clone / w) == _sha(origin / w) for w in WEIGHTS if w != WEIGHTS[3])


def test_git_lfs_absent_names_the_install_command(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))  # git, but no git-lfs on PATH
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(GitLfsMissing) as exc:
        lfs.clone("file:///nowhere", tmp_path / "clone")
    assert exc.value.one_line == ("git-lfs is not installed: a clone would give ~130-byte pointer files, not "
                                  f"weights fix: {lfs.install_command()}")
    assert isinstance(exc.value, FileNotFoundError) and not (tmp_path / "clone").exists()


@pytest.mark.parametrize("system, os_release, command", [
    ("Linux", 'ID=debian\nVERSION_ID="12"\n', "sudo apt-get install git-lfs && git lfs install"),
    ("Linux", 'ID=ubuntu\nID_LIKE=debian\n', "sudo apt-get install git-lfs && git lfs install"),
    ("Linux", 'ID="rocky"\nID_LIKE="rhel centos fedora"\n', "sudo dnf install git-lfs && git lfs install"),
    ("Linux", "ID=arch\n", "sudo pacman -S git-lfs && git lfs install"),
    ("Darwin", "", "brew install git-lfs && git lfs install"),
    ("Linux", "ID=plan9\n", "install git-lfs from https://git-lfs.com, then run: git lfs install"),
])
def test_install_command_per_system(system, os_release, command):
    assert lfs.install_command(system, os_release) == command


def test_ls_files_without_json_support(origin, tmp_path, monkeypatch):
    """git-lfs before 3.2 has no ``ls-files --json``: the ``--long`` fallback gives the same answer."""
    clone = lfs.clone(origin.as_uri(), tmp_path / "clone")
    lfs.pull(clone, include=["vae/*"])
    expected = lfs.ls_files(clone)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "git-lfs").write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "--json" ] && '
                                  '{ echo "Error: unknown flag: --json" >&2; exit 2; }; done\n'
                                  f'exec {shutil.which("git-lfs")} "$@"\n')
    (shim / "git-lfs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(GitCommandFailed, match="unknown flag: --json"):
        lfs._git(["lfs", "ls-files", "--json"], cwd=clone)
    assert lfs.ls_files(clone) == expected
    assert [f.checked_out for f in expected] == [False, False, False, False, True]


def test_git_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing at all
    with pytest.raises(GitLfsMissing) as exc:
        lfs.git_lfs_version()
    assert exc.value.one_line == ("git is not installed: model repositories cannot be cloned fix: "
                                  + lfs.install_command().replace("git-lfs", "git git-lfs", 1))
    assert lfs.lfs_oids(tmp_path) == {}  # verification goes on without expected hashes
