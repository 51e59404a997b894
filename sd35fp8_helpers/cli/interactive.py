"""``demo``: a Gradio page for one person, rendering through the same engine as ``serve``."""

from __future__ import annotations

from ..constants import DEFAULT_MODEL
from ..vocabulary import PRECISIONS


def demo_arguments(p) -> None:
    from ..interactive.demo import DEFAULT_DEMO_PORT

    p.add_argument("--model", default=DEFAULT_MODEL, help="scenes (the embedded trained model), tiny (random weights), a diffusers folder, or a hub repo id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_DEMO_PORT)
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def demo(args) -> int:
    from ..interactive.demo import build_demo
    from ..serving.engine import ImageEngine

    engine = ImageEngine(args.model, precision=args.precision, device=args.device)
    engine.pipeline()  # loaded once, before the page opens
    page = build_demo(engine)
    page.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port)
    return 0
