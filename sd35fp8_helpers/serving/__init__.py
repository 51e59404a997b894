"""From notebook to service: the OpenAI-style images API, its queue, keys, metrics and logs — in one process,
or with a Redis job queue (Celery) in front of one ``sd35fp8 worker`` per GPU.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "ServeConfig": ".config",
    "ImageEngine": ".engine",
    "create_app": ".app",
    "run_server": ".app",
    "KeyStore": ".auth",
    "hash_api_key": ".auth",
    "new_api_key": ".auth",
    "JwtConfig": ".jwt_auth",
    "make_jwt": ".jwt_auth",
    "JobStore": ".jobstore",
    "QueueWorker": ".worker",
    "WorkerConfig": ".worker",
    "run_batch": ".batch",
    "start_redis": ".redis_server",
    "start_worker": ".client",
    "start_server": ".client",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
