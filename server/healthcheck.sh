#!/bin/bash
# Docker healthcheck of the server and auth images: exit 0 when GET /health on
# 127.0.0.1:PORT answers STATUS.
# Plain bash (/dev/tcp) because starting Python costs ~150 ms of CPU per check here: every 3 s,
# that was 5% of a core per service at idle, and noise in every measurement.
set -eu
port=${1:?usage: healthcheck.sh PORT STATUS} expected=${2:?usage: healthcheck.sh PORT STATUS}
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$port" >&3
read -r -t 2 _ status _ <&3
[ "$status" = "$expected" ]
