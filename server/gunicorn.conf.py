"""gunicorn settings for the tracking server; each can be overridden from the environment."""

import gc
import os
import sys

bind = "0.0.0.0:5000"
# guard.py and accel.py live beside this file; the app (guard:create_app()) is imported from it.
pythonpath = os.path.dirname(os.path.abspath(__file__))
# uvicorn workers: MLflow's app is ASGI (streaming artifact router, OTLP) with the Flask API
# mounted inside it; gunicorn supervises them without uvicorn's keep-alive stall.
worker_class = "uvicorn_worker.UvicornWorker"
workers = int(os.environ.get("SERVER_WORKERS", "2"))
# Longer than nginx's upstream keepalive_timeout, so nginx, not gunicorn, closes idle
# connections and never sends a request on a socket the server is closing.
keepalive = 75
# Uploads and downloads stream on the event loop, which keeps heartbeating; this only bounds
# a worker that is truly stuck.
timeout = int(os.environ.get("SERVER_WORKER_TIMEOUT", "300"))
graceful_timeout = 30
# Only requests that carry nginx's proxy secret reach MLflow (guard.py), and nginx writes
# X-Forwarded-For and -Proto itself, so forwarded headers are trusted.
forwarded_allow_ips = "*"
# nginx writes the access log with the authenticated user; a second log here only costs time.
accesslog = None
errorlog = "-"
# The root file system is read-only (compose.yaml): the workers' heartbeat files go to /dev/shm
# (memory), and no control socket is made (gunicornc is never used; by default gunicorn 25+
# creates one under the home directory).
worker_tmp_dir = "/dev/shm"
control_socket_disable = True


def post_worker_init(worker):
    """Tune each worker once MLflow is imported, before it serves a request."""
    # (gunicorn's pythonpath has done this already; kept for hooks run on their own.)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import accel
    import artifactstore
    import registry
    import storefull

    # Downloads: nginx sends the file itself, else big chunks (accel.py says how and why).
    accel.install()
    # Model-version files registered from runs:/ URIs (registry.py says why).
    registry.install()
    # Uploads into a full artifact volume: 507 and why, not a 500 clients retry (storefull.py).
    storefull.install()
    # An object store's bytes go through the proxy, not presigned URLs (artifactstore.py).
    artifactstore.install()
    # Artifacts are opened in the stack's artifact store only, whatever a run names.
    artifactstore.confine()
    # No "Server: uvicorn" banner (nginx never passes it on, but the server's own address
    # answers the backend network's other containers too). uvicorn builds its default headers
    # from this when the worker starts serving, after this hook; gunicorn's own Server header
    # is only sent by its sync workers.
    config = getattr(worker, "config", None)
    if config is not None:
        config.server_header = False
        # MLflow's Flask half sends its own Date, so uvicorn's made two, and nginx logged a
        # warning per answer (the UI's static files). nginx sends its own Date either way.
        config.date_header = False
    # MLflow's runs search (and /graphql) run `from mlflow.server import auth` on every call,
    # to apply MLflow's own permissions. This stack authenticates at the edge and never runs
    # that app, and without its "auth" extra the import fails, but only after re-executing
    # the module's ~480 lines of imports each time: 6-8 ms of every runs search here. Marked
    # absent, the same ImportError is immediate. tests/unit/test_server_tuning.py fails once
    # the pinned MLflow stops importing it per call.
    sys.modules.setdefault("mlflow.server.auth", None)
    # A worker holds ~330,000 long-lived objects from importing MLflow, and every full garbage
    # collection walked them all, in the middle of some request. Frozen, collections walk only
    # what requests allocate: a runs search went from 55 to 40 ms here. SERVER_GC_FREEZE=false
    # turns it off, to compare.
    if os.environ.get("SERVER_GC_FREEZE", "true") == "true":
        gc.collect()
        gc.freeze()
        worker.log.info("garbage collector: %d start-up objects frozen", gc.get_freeze_count())
