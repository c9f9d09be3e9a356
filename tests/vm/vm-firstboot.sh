#!/bin/sh
# Before sshd: make host keys if missing and install the test's public key for `ops`.
# systemd does not pass the container's environment to units; PID 1's environ holds it.
set -eu
ssh-keygen -A
key=$(tr '\0' '\n' </proc/1/environ | sed -n 's/^AUTHORIZED_KEY=//p')
if [ -n "$key" ]; then
    install -d -m 0700 -o ops -g ops /home/ops/.ssh
    printf '%s\n' "$key" >/home/ops/.ssh/authorized_keys
    chown ops:ops /home/ops/.ssh/authorized_keys
    chmod 0600 /home/ops/.ssh/authorized_keys
fi
