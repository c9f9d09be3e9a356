"""gunicorn settings for the gate; nginx calls it once per client request."""

import os

bind = "0.0.0.0:8000"
# Threads, not processes, carry the load: a cached check is microseconds of Python, and nginx
# answers most repeats itself (nginx/njs/verdicts.js), so one process is plenty. One process
# also makes GATE_BCRYPT_SLOTS the bound for the whole gate: with the default of 1, a password
# flood runs at most one bcrypt check at a time, never every core. gunicorn's master restarts
# a crashed worker.
worker_class = "gthread"
workers = int(os.environ.get("GATE_WORKERS", "1"))
threads = int(os.environ.get("GATE_THREADS", "8"))
# nginx keeps upstream connections open (upstream keepalive); this must outlast its 60 s.
keepalive = 75
# nginx sends the normalized path percent-encoded in X-Original-Path: up to three times the
# longest request line nginx reads (8 KiB), which mlflowstack.forwarded accepts. gunicorn's
# default field limit (8190) answered 400 without the nonce, hence 500 for a long URL.
limit_request_field_size = 3 * 8192 + 64
timeout = 30
accesslog = None
errorlog = "-"
# The root file system is read-only (compose.yaml): the workers' heartbeat files go to /dev/shm
# (memory), and no control socket is made (gunicornc is never used; by default gunicorn 25+
# creates one under the home directory).
worker_tmp_dir = "/dev/shm"
control_socket_disable = True
