# gunicorn settings for the payflow API; every value comes from PAYFLOW_* variables.
import os

from payflow.config import Config

_config = Config.load()

bind = f"{_config.host}:{_config.port}"
# gthread: each process serves `threads` requests at once with one small pool;
# the pool's max size matches the thread count so no thread waits on another.
worker_class = "gthread"
workers = int(os.environ.get("PAYFLOW_WEB_WORKERS", (os.cpu_count() or 1)))
threads = int(os.environ.get("PAYFLOW_WEB_THREADS", _config.pool_size_max))
# SIGTERM lets in-flight requests finish for up to this long.
graceful_timeout = 30
timeout = 30
keepalive = 5
# Each worker builds its own app (and its pool) after the fork.
preload_app = False
# PAYFLOW_ACCESS_LOG="" turns the access log off (benchmarks, tests).
accesslog = os.environ.get("PAYFLOW_ACCESS_LOG", "-") or None
errorlog = "-"
loglevel = "info"


def worker_exit(server, worker):
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("payflow") if app else None
    if services is not None:
        services.close()
