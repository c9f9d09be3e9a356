#!/bin/bash
# Healthcheck of the serving container: every model of SERVE_MODELS answers /health (MLflow's
# scoring app: 200 once the model is loaded). Model i listens on 5100 + i (server/serving.py).
set -eu
IFS=',' read -ra entries <<< "${SERVE_MODELS:-}"
port=5100
for entry in "${entries[@]}"; do
    [ -n "${entry// /}" ] || continue
    /opt/mlflow-stack/healthcheck.sh "$port" 200
    port=$((port + 1))
done
