"""The HPACK codec of our HTTP/2 connections: RFC 7541's examples, agreement with the
`hpack` package both ways, strictness on malformed blocks, and the block cache."""

from __future__ import annotations

import random
from collections.abc import Iterator

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman

from sidecar.upstream import h2hpack
from sidecar.upstream.h2hpack import Decoder, Encoder, Header, HeaderListTooLarge, HPACKError

NGINX_BLOCK = (
    b"\x88v\x89\xaacU\xe5\x80\xae!.\x1fa\x96\xdfi~\x94\x00T\xbeR( \t\xc5\x04\x1b\x82\r\xc6_S\x16\x8d\xff_\x87I|"
    b"\xa5\x8a\xe8\x19\xaa\\\x041024l\x96\xdfi~\x94\x00T\xbeR( \t\xc5\x04\x1b\x82\r\xc14\xa6-\x1b\xff\x00\x83*G7"
    b"\x8b\xfe\\\x8c\x12\xb26\xdaY\xa0\x03\xf9\x00\x89\x19\x08Z\xd2\xb5\x83\xaab\xa3\x84\x8f\xd2J\x8f"
)


@pytest.fixture(autouse=True)
def _cold_caches() -> Iterator[None]:
    h2hpack._block_cache.clear()
    h2hpack._huffman_cache.clear()
    yield
    h2hpack._block_cache.clear()
    h2hpack._huffman_cache.clear()


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def pairs(text: str) -> list[Header]:
    """`name: value` lines as header tuples."""
    out = []
    for line in text.strip().splitlines():
        name, _, value = line.strip().partition(": ")
        out.append((name.encode(), value.encode()))
    return out


def reference(block: bytes, decoder: hpack.Decoder) -> list[Header]:
    return [(bytes(name), bytes(value)) for name, value in decoder.decode(block, raw=True)]


def uncached(decoder: Decoder, block: bytes) -> list[Header]:
    """What `decoder` makes of `block` with the cache neither read nor filled."""
    return decoder._decode(block, False)


# ------------------------------------------------------------------ RFC 7541 Appendix C


def test_c2_1_literal_with_indexing() -> None:
    decoder = Decoder()
    block = unhex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")
    assert decoder.decode(block) == [(b"custom-key", b"custom-header")]
    assert decoder.table_entries() == [(b"custom-key", b"custom-header")]
    assert decoder.table_size == 55


def test_c2_2_literal_without_indexing() -> None:
    decoder = Decoder()
    assert decoder.decode(unhex("040c 2f73 616d 706c 652f 7061 7468")) == [(b":path", b"/sample/path")]
    assert decoder.table_entries() == [] and decoder.table_size == 0


def test_c2_3_literal_never_indexed() -> None:
    decoder = Decoder()
    assert decoder.decode(unhex("1008 7061 7373 776f 7264 0673 6563 7265 74")) == [(b"password", b"secret")]
    assert decoder.table_entries() == [] and decoder.table_size == 0


def test_c2_4_indexed() -> None:
    decoder = Decoder()
    assert decoder.decode(b"\x82") == [(b":method", b"GET")]
    assert decoder.table_entries() == [] and decoder.table_size == 0


REQUEST_1 = pairs(
    """
    :method: GET
    :scheme: http
    :path: /
    :authority: www.example.com
    """
)
REQUEST_2 = [*REQUEST_1, (b"cache-control", b"no-cache")]
REQUEST_3 = pairs(
    """
    :method: GET
    :scheme: https
    :path: /index.html
    :authority: www.example.com
    custom-key: custom-value
    """
)
REQUEST_TABLES = [
    ([(b":authority", b"www.example.com")], 57),
    ([(b"cache-control", b"no-cache"), (b":authority", b"www.example.com")], 110),
    ([(b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"), (b":authority", b"www.example.com")], 164),
]

C3 = [
    unhex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
    unhex("8286 84be 5808 6e6f 2d63 6163 6865"),
    unhex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
]
C4 = [
    unhex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
    unhex("8286 84be 5886 a8eb 1064 9cbf"),
    unhex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
]

RESPONSE_1 = pairs(
    """
    :status: 302
    cache-control: private
    date: Mon, 21 Oct 2013 20:13:21 GMT
    location: https://www.example.com
    """
)
RESPONSE_2 = [(b":status", b"307"), *RESPONSE_1[1:]]
COOKIE = (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
RESPONSE_3 = [
    (b":status", b"200"),
    (b"cache-control", b"private"),
    (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
    (b"location", b"https://www.example.com"),
    (b"content-encoding", b"gzip"),
    COOKIE,
]
RESPONSE_TABLES = [
    (RESPONSE_1[::-1], 222),
    ([(b":status", b"307"), *RESPONSE_1[:0:-1]], 222),
    ([COOKIE, (b"content-encoding", b"gzip"), (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT")], 215),
]

C5 = [
    unhex(
        """4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
        2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"""
    ),
    unhex("4803 3330 37c1 c0bf"),
    unhex(
        """88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
        54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
        5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31"""
    ),
]
C6 = [
    unhex(
        """4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
        2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3"""
    ),
    unhex("4883 640e ffc1 c0bf"),
    unhex(
        """88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
        77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
        9587 3160 65c0 03ed 4ee5 b106 3d50 07"""
    ),
]


@pytest.mark.parametrize(
    ("blocks", "lists", "tables", "table_size"),
    [
        pytest.param(C3, [REQUEST_1, REQUEST_2, REQUEST_3], REQUEST_TABLES, 4096, id="C.3"),
        pytest.param(C4, [REQUEST_1, REQUEST_2, REQUEST_3], REQUEST_TABLES, 4096, id="C.4"),
        pytest.param(C5, [RESPONSE_1, RESPONSE_2, RESPONSE_3], RESPONSE_TABLES, 256, id="C.5"),
        pytest.param(C6, [RESPONSE_1, RESPONSE_2, RESPONSE_3], RESPONSE_TABLES, 256, id="C.6"),
    ],
)
def test_rfc7541_appendix_c_sequences(blocks, lists, tables, table_size) -> None:
    # Twice, each time on a new connection: the second time the blocks that
    # reference only the static table come from the cache.
    for _ in range(2):
        decoder = Decoder(max_table_size=table_size)
        for block, expected, (table, size) in zip(blocks, lists, tables, strict=True):
            assert decoder.decode(block) == expected
            assert decoder.table_entries() == table
            assert decoder.table_size == size
    # The first block names only static entries; the second indexes dynamic ones.
    assert blocks[0] in h2hpack._block_cache
    assert blocks[1] not in h2hpack._block_cache


def test_the_nginx_block() -> None:
    expected = reference(NGINX_BLOCK, hpack.Decoder())
    assert [name for name, _ in expected] == [
        b":status",
        b"server",
        b"date",
        b"content-type",
        b"content-length",
        b"last-modified",
        b"etag",
        b"accept-ranges",
    ]
    decoder = Decoder()
    assert decoder.decode(NGINX_BLOCK) == expected
    assert NGINX_BLOCK in h2hpack._block_cache
    first_table = decoder.table_entries()
    assert decoder.decode(NGINX_BLOCK) == expected
    # The five literals with incremental indexing went in again, from the cache.
    assert decoder.table_entries() == first_table[:5] + first_table


def test_names_are_returned_as_sent() -> None:
    block = b"\x00\x0aX-Custom-A\x01v" + b"\x40\x04Mixd\x01w"
    assert Decoder().decode(block) == [(b"X-Custom-A", b"v"), (b"Mixd", b"w")]
