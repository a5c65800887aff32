"""Raw loopback + disk: the limit an upload server cannot beat on this machine.

A minimal HTTP ``PUT`` sink: for each request it reads ``Content-Length`` bytes from
the socket in 1 MiB blocks, writes them to a file, ``fsync``s it (stdaemon acknowledges
only durable objects) and answers ``200``.  :func:`send` is the matching client: the
file goes out with ``socket.sendfile`` (no copies in user space).  No parsing beyond
the request line and headers, no hashing, no threads.

Usage: ``python -m bench.sink --port N --dir DIR``.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

BLOCK = 1024 * 1024


def _headers(conn: socket.socket, buffered: bytes) -> tuple[bytes, bytes]:
    while b"\r\n\r\n" not in buffered:
        chunk = conn.recv(65536)
        if not chunk:
            return b"", b""
        buffered += chunk
    head, _, rest = buffered.partition(b"\r\n\r\n")
    return head, rest


def serve_one(conn: socket.socket, directory: str, counter: list) -> None:
    buffered = b""
    while True:
        head, buffered = _headers(conn, buffered)
        if not head:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        counter[0] += 1
        path = os.path.join(directory, f"sink-{counter[0]}.bin")
        with open(path, "wb") as fh:
            if buffered:
                fh.write(buffered[:length])
                remaining = length - len(buffered[:length])
                buffered = buffered[length:]
            else:
                remaining = length
            while remaining > 0:
                chunk = conn.recv(min(BLOCK, remaining))
                if not chunk:
                    return
                fh.write(chunk)
                remaining -= len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.unlink(path)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def send(port: int, path: str, timeout: float = 300.0) -> float:
    """PUT ``path`` to the sink; seconds until its 200 arrived."""
    size = os.path.getsize(path)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock, open(path, "rb") as fh:
        sock.sendall(f"PUT /object HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n\r\n".encode())
        sock.sendfile(fh)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"sink answered {answer[:80]!r}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(8)
    counter = [0]
    while True:
        conn, _ = listener.accept()
        with conn:
            serve_one(conn, args.dir, counter)


if __name__ == "__main__":
    main()
