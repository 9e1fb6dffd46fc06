# gunicorn settings for the payflow API; every value comes from PAYFLOW_* variables.
import os
import shutil
import tempfile

from gunicorn.glogging import Logger

from payflow.config import Config

_config = Config.load()

# Prometheus multiprocess mode: each worker writes its samples under this
# folder and /metrics adds them up. Set here, in the master, before any worker
# imports prometheus_client; a fresh folder per server start.
_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="payflow-metrics-")
else:  # the operator's folder: empty it, so no old run's samples count again
    for _stale in os.scandir(os.environ["PROMETHEUS_MULTIPROC_DIR"]):
        if _stale.name.endswith(".db"):
            os.unlink(_stale.path)

bind = f"{_config.host}:{_config.port}"
# gthread: each process serves `threads` requests at once with one small pool;
# the pool's max size matches the thread count so no thread waits on another.
# (payflow's subclass answers requests gunicorn cannot parse in JSON.)
worker_class = "payflow.web_worker.JsonErrorThreadWorker"
workers = int(os.environ.get("PAYFLOW_WEB_WORKERS", (os.cpu_count() or 1)))
threads = int(os.environ.get("PAYFLOW_WEB_THREADS", _config.pool_size_max))
# SIGTERM lets in-flight requests finish for up to this long.
graceful_timeout = 30
timeout = 30
keepalive = 5
# Each worker builds its own app (and its pool) after the fork.
preload_app = False
# payflow logs one JSON line per request itself; gunicorn's access log is off
# unless PAYFLOW_ACCESS_LOG names a file ("-" for stdout).
accesslog = os.environ.get("PAYFLOW_ACCESS_LOG") or None
errorlog = "-"
loglevel = "info"
# gunicorn's own lines in the same JSON shape as payflow's.
_ACCESS_HANDLER = ({"class": "logging.StreamHandler", "stream": "ext://sys.stdout"} if accesslog == "-"
                   else {"class": "logging.FileHandler", "filename": accesslog})
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "payflow.logs.formatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                            "stream": "ext://sys.stderr"},
                 **({"access": {**_ACCESS_HANDLER, "formatter": "json"}} if accesslog else {})},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {"gunicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                "gunicorn.access": {"handlers": ["access"] if accesslog else [], "level": "INFO",
                                    "propagate": False}},
}


class AccessLogOnlyWhenAsked(Logger):
    """gunicorn builds an access line for every request whenever a logging
    dict is configured, whatever `accesslog` says (~0.1 ms of CPU a request)."""

    @property
    def access_log_enabled(self) -> bool:
        return bool(self.cfg.accesslog)


logger_class = AccessLogOnlyWhenAsked


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def worker_exit(server, worker):
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("payflow") if app else None
    if services is not None:
        services.close()
