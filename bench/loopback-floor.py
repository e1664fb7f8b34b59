#!/usr/bin/env python3
"""The floor of any transfer of a file between two processes over loopback TCP.

usage: bench/loopback-floor.py SOURCE DEST

A child process accepts one connection, receives the bytes in 1 MiB reads, writes each
into DEST and syncs the file (fsync) once the sender closes; the parent reads SOURCE in
1 MiB reads and sends each (sendall). Nothing is hashed, framed or acknowledged: this is
what `tessera model push` and `pull` do minus HTTP, BLAKE3, signatures and records. Prints
the wall time in seconds, from the connection to the receiver's sync; DEST is left in
place.
"""
import os
import socket
import sys
import time

CHUNK = 1 << 20


def receive(listener: socket.socket, dest: str) -> None:
    conn, _ = listener.accept()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        done = 0
        while done < n:
            done += os.write(fd, view[done:n])
    os.fsync(fd)
    os.close(fd)
    conn.close()


def main() -> None:
    source, dest = sys.argv[1], sys.argv[2]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    child = os.fork()
    if child == 0:
        code = 1
        try:
            receive(listener, dest)
            code = 0
        except Exception as e:  # reported here: os._exit skips the traceback
            print(f"error: the receiver: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    # Only the child accepts: if it fails first, the connection is refused, not left waiting.
    listener.close()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        fd = os.open(source, os.O_RDONLY)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            conn.sendall(view[:n])
        os.close(fd)
    _, status = os.waitpid(child, 0)
    if status != 0 or os.path.getsize(dest) != os.path.getsize(source):
        sys.exit("error: the receiver failed")
    print(f"{time.monotonic() - start:.2f}")


if __name__ == "__main__":
    main()
