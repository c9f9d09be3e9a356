"""A desynchronised gate connection, for tests/stack/test_gate_desync.py (runs in a container).

Request splitting once left an extra answer queued on one of nginx's keep-alive connections to
the gate, so every later question on it got the answer meant for the one before. This stands
between an nginx and the real gate and does exactly that: each question nginx asks is passed
to the real gate, but nginx gets the previous answer; the first one it gets is the real gate's
answer to a smuggled ``GET /health`` (204, as in the reported attack). Standard library only.
"""

import socket
import sys
import threading

UPSTREAM = (sys.argv[1], int(sys.argv[2]))


def read_head(stream) -> bytes | None:
    lines = []
    while True:
        line = stream.readline(65536)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def read_answer(stream) -> bytes | None:
    head = read_head(stream)
    if head is None:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (stream.read(length) if length else b"")


def relay(client: socket.socket) -> None:
    with client, socket.create_connection(UPSTREAM) as upstream:
        from_client, from_gate = client.makefile("rb"), upstream.makefile("rb")
        upstream.sendall(b"GET /health HTTP/1.1\r\nHost: gate\r\n\r\n")
        pending = read_answer(from_gate)
        while pending is not None:
            question = read_head(from_client)
            if question is None:
                return
            upstream.sendall(question)
            answer = read_answer(from_gate)
            client.sendall(pending)
            pending = answer


def main() -> None:
    server = socket.create_server(("0.0.0.0", 8000), reuse_port=True)
    print("desync gate listening", flush=True)
    while True:
        client, _ = server.accept()
        threading.Thread(target=relay, args=(client,), daemon=True).start()


if __name__ == "__main__":
    main()
