"""gunicorn settings for the tracking server; each can be overridden from the environment."""

import os

bind = "0.0.0.0:5000"
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
# Only nginx can reach this port (internal network), so its forwarded headers are trusted.
forwarded_allow_ips = "*"
# nginx writes the access log with the authenticated user; a second log here only costs time.
accesslog = None
errorlog = "-"
