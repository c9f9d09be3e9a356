"""Exit 0 when the tracking server answers /health on its own port (Docker healthcheck)."""

import sys
import urllib.request

try:
    with urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
