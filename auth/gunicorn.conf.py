"""gunicorn settings for the gate; nginx calls it once per client request."""

import os

bind = "0.0.0.0:8000"
# Threads, not processes, carry the load: a cached check is microseconds of Python, and bcrypt
# releases the GIL, so a few threads per worker keep both cores busy without more copies of
# the cache. Two workers survive one crashing.
worker_class = "gthread"
workers = int(os.environ.get("GATE_WORKERS", "2"))
threads = int(os.environ.get("GATE_THREADS", "8"))
# nginx keeps upstream connections open (upstream keepalive); this must outlast its 60 s.
keepalive = 75
timeout = 30
accesslog = None
errorlog = "-"
