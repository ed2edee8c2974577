"""HPACK header coding per request: ``sidecar/upstream/h2hpack.py`` against the ``hpack`` package.

    .venv/bin/python -m bench.hpack_codec [--rounds 20000]

In-process, a tight loop, best of five, µs per call:

* **decode**: a real nginx h2c response header block (``:status``, ``server``,
  ``date``, ``content-type``, ``content-length``, ``last-modified``, ``etag``,
  ``accept-ranges``; five literals with incremental indexing on static names),
  on one decoder that keeps decoding it as a connection does; ours from the
  block cache (the steady state), missing the block cache with the Huffman
  strings seen before (a new ``date``), and missing both (cold), then
  ``hpack.Decoder``;
* **encode**: a typical request's header list, ours (no dynamic table, no
  Huffman), then ``hpack.Encoder`` with and without Huffman coding.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

import hpack

from sidecar.upstream import h2hpack

NGINX_BLOCK = (
    b"\x88v\x89\xaacU\xe5\x80\xae!.\x1fa\x96\xdfi~\x94\x00T\xbeR( \t\xc5\x04\x1b\x82\r\xc6_S\x16\x8d\xff_\x87I|"
    b"\xa5\x8a\xe8\x19\xaa\\\x041024l\x96\xdfi~\x94\x00T\xbeR( \t\xc5\x04\x1b\x82\r\xc14\xa6-\x1b\xff\x00\x83*G7"
    b"\x8b\xfe\\\x8c\x12\xb26\xdaY\xa0\x03\xf9\x00\x89\x19\x08Z\xd2\xb5\x83\xaab\xa3\x84\x8f\xd2J\x8f"
)

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"api.internal:8080"),
    (b":path", b"/v1/items?id=12345"),
    (b"user-agent", b"python-httpx/0.28.1"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"x-request-id", b"0f8e3a2b-9c1d-4e5f-a6b7-c8d9e0f1a2b3"),
    (b"authorization", b"Bearer abcdef0123456789"),
]


def _best(call: Callable[[], object], rounds: int) -> float:
    return min(timeit.repeat(call, number=rounds, repeat=5)) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds

    theirs_decoder = hpack.Decoder()
    expected = [(bytes(n), bytes(v)) for n, v in theirs_decoder.decode(NGINX_BLOCK, raw=True)]
    ours = h2hpack.Decoder()
    assert ours.decode(NGINX_BLOCK) == expected

    def block_cache_miss() -> None:
        h2hpack._block_cache.clear()
        ours.decode(NGINX_BLOCK)

    def cold() -> None:
        h2hpack._block_cache.clear()
        h2hpack._huffman_cache.clear()
        ours.decode(NGINX_BLOCK)

    encoder, theirs_encoder = h2hpack.Encoder(), hpack.Encoder()
    assert [tuple(h) for h in hpack.Decoder().decode(encoder.encode(REQUEST), raw=True)] == REQUEST
    cases: list[tuple[str, Callable[[], object]]] = [
        ("decode: ours, block cache hit", lambda: ours.decode(NGINX_BLOCK)),
        ("decode: ours, block cache miss", block_cache_miss),
        ("decode: ours, both caches cold", cold),
        ("decode: hpack.Decoder", lambda: theirs_decoder.decode(NGINX_BLOCK, raw=True)),
        ("encode: ours", lambda: encoder.encode(REQUEST)),
        ("encode: hpack.Encoder, no Huffman", lambda: theirs_encoder.encode(REQUEST, huffman=False)),
        ("encode: hpack.Encoder, Huffman", lambda: theirs_encoder.encode(REQUEST)),
    ]
    for label, call in cases:
        print(f"{label:36s} {_best(call, rounds):7.2f} µs")


if __name__ == "__main__":
    main()
