"""bench/tcp.py: TCP throughput pieces of `bench/run`.
  tcp.py sink ADDR PORT        serve: read each connection to EOF, reply the count
  tcp.py send ADDR PORT MIB    send MIB MiB, half-close, wait for the count;
                               print MB/s (connect to reply)."""
import socket
import sys
import threading
import time


def sink(addr, port):
    server = socket.create_server((addr, port), backlog=64)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def drain(conn):
    total = 0
    while True:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    conn.sendall(f"{total}\n".encode())
    conn.close()


def send(addr, port, mib):
    block = b"\xa5" * (1 << 20)
    start = time.monotonic()
    conn = socket.create_connection((addr, port), timeout=60)
    for _ in range(mib):
        conn.sendall(block)
    conn.shutdown(socket.SHUT_WR)
    reply = conn.makefile().readline().strip()
    elapsed = time.monotonic() - start
    if reply != str(mib << 20):
        sys.exit(f"sink received {reply!r}, expected {mib << 20}")
    print(f"{(mib << 20) / 1e6 / elapsed:.0f}")


if sys.argv[1] == "sink":
    sink(sys.argv[2], int(sys.argv[3]))
else:
    send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
