"""Exit 0 when the gate answers /health (Docker healthcheck)."""

import sys
import urllib.request

try:
    with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2) as response:
        sys.exit(0 if response.status == 204 else 1)
except OSError:
    sys.exit(1)
