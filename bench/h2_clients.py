"""CPU per request of an HTTP/2 client connection's protocol code alone, against nginx (h2c).

    .venv/bin/python -m bench.h2_clients [--requests 5000] [--jh2 /path/to/venv/bin/python]

One blocking socket, one request at a time (a 1 KiB GET, the headers a
proxied request carries), the same loop for each client: the sidecar's own
``sidecar/upstream/h2core.py``, h2 (the state machine httpcore runs on, with
hpack's header coding), and, if a Python with ``jh2`` is given, jh2 (h2's
fork with Rust header coding).  The figure is this process's CPU time per
request (a few µs of it are the socket calls every client makes alike).
Results go to stdout.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench import LOOPBACK, Service, nginx_common, pick_ports, write

_LOOP = r"""
import socket, sys, time
port, requests, client = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", port))
HEADERS = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1"), (b":path", b"/1k"),
           (b"user-agent", b"wrk"), (b"accept", b"*/*"), (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
           (b"x-forwarded-for", b"127.0.0.1")]
if client == "sidecar":
    from sidecar.upstream import h2core
    c = h2core.ClientCore()
    s.sendall(c.data_to_send())
    def request():
        sid = c.start_request(HEADERS, end_stream=True)
        s.sendall(c.data_to_send())
        while True:
            for kind, stream_id, a, _ in c.receive(s.recv(65536)):
                if kind == h2core.DATA:
                    c.consumed(stream_id, len(a))
                elif kind == h2core.END and stream_id == sid:
                    out = c.data_to_send()
                    if out:
                        s.sendall(out)
                    return
            out = c.data_to_send()
            if out:
                s.sendall(out)
else:
    lib = __import__(client)
    __import__(client + ".connection"); __import__(client + ".config"); __import__(client + ".events")
    events = getattr(lib, "events")
    c = lib.connection.H2Connection(config=lib.config.H2Configuration(client_side=True, validate_inbound_headers=False))
    c.initiate_connection()
    c.increment_flow_control_window(2**24)
    s.sendall(c.data_to_send())
    def request():
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, HEADERS, end_stream=True)
        s.sendall(c.data_to_send())
        while True:
            done = False
            for event in c.receive_data(s.recv(65536)):
                if isinstance(event, events.DataReceived):
                    c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, events.StreamEnded) and event.stream_id == sid:
                    done = True
            out = c.data_to_send()
            if out:
                s.sendall(out)
            if done:
                return
for _ in range(300):
    request()
start = time.process_time()
for _ in range(requests):
    request()
print(f"{(time.process_time() - start) / requests * 1e6:.1f}")
"""


def _nginx_conf(work: Path, h2c: int) -> Path:
    """nginx answering h2c, without sendfile: HEADERS and DATA in one write.  (With
    sendfile they go out as two segments, and one request at a time then waits
    out the delayed ACK: 40 ms a request, and CPU time that is the kernel's.)"""
    main, http = nginx_common(work, "upstream-nginx")
    (work / "www").mkdir(exist_ok=True)
    (work / "www" / "1k").write_bytes(b"x" * 1024)
    return write(
        work / "upstream-nginx.conf",
        f"""
        {main}
        http {{
            {http}
            sendfile off;
            server {{
                listen {LOOPBACK}:{h2c} http2;
                root {work / "www"};
            }}
        }}
        """,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--jh2", help="a Python interpreter with jh2 installed")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sidecar-h2clients-"))
    (h2c,) = pick_ports(1)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    upstream = Service("upstream-nginx", [nginx, "-c", str(_nginx_conf(work, h2c))], h2c, "1", work)
    upstream.start()
    root = str(Path(__file__).resolve().parent.parent)
    try:
        print(f"HTTP/2 client protocol code, CPU µs per 1 KiB GET against nginx on {LOOPBACK}:{h2c}")
        runs = [("sidecar h2core", sys.executable, "sidecar"), ("h2", sys.executable, "h2")]
        if args.jh2:
            runs.append(("jh2", args.jh2, "jh2"))
        for label, python, client in runs:
            out = subprocess.run(
                [python, "-c", _LOOP, str(h2c), str(args.requests), client],
                capture_output=True,
                text=True,
                cwd=root,
                env={"PYTHONPATH": root},
                timeout=300,
                check=True,
            )
            print(f"  {label:16} {out.stdout.strip()} µs")
    finally:
        upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
