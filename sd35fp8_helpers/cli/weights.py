"""``verify`` and ``download``: getting weights and proving them whole."""

from __future__ import annotations


def verify_arguments(p) -> None:
    p.add_argument("model_dir", help="a diffusers folder (model_index.json) or a folder of weight files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 checks (headers only: seconds, not minutes)")

def verify(args) -> int:
    from ..weights.verify import VerifyConfig, verify_model

    report = verify_model(args.model_dir, VerifyConfig(check_hashes=not args.no_hash))
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


def download_arguments(p) -> None:
    p.add_argument("repo_id", help="owner/name on the hub, e.g. stabilityai/stable-diffusion-3.5-medium")
    p.add_argument("--include", nargs="+", default=None, metavar="PATTERN",
                   help="only files matching these globs (default: everything)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--local-dir", default=None, help="plain files here (default: the hub cache, HF_HUB_CACHE)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check after downloading")

def download(args) -> int:
    from ..weights.hub import download as fetch

    result = fetch(args.repo_id, include=args.include, revision=args.revision, local_dir=args.local_dir,
                      verify=not args.no_verify, echo=lambda line: print(line, flush=True))
    print(f"downloaded: {result}")
    return 0
