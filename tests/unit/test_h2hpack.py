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


# ------------------------------------------------------------------ against the hpack package

_NAMES = [name for name, _ in h2hpack._STATIC[1:]] + [b"x-request-id", b"x-trace", b"x-a", b"custom-key"]
_VALUES = [b"", b"0", b"200", b"gzip, deflate", b"text/html; charset=utf-8", b"nginx/1.22.1"]


def random_headers(rng: random.Random) -> list[Header]:
    headers = []
    for _ in range(rng.randrange(0, 12)):
        kind = rng.random()
        if kind < 0.25:
            headers.append(rng.choice(h2hpack._STATIC[1:]))
            continue
        name = (
            rng.choice(_NAMES)
            if kind < 0.8
            else bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz-") for _ in range(rng.randrange(1, 200)))
        )
        if rng.random() < 0.5:
            value = rng.choice(_VALUES)
        else:
            value = bytes(rng.randrange(256) for _ in range(rng.choice((1, 5, 30, 126, 127, 128, 300))))
        headers.append((name, value))
    return headers


@pytest.mark.parametrize("huffman", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_blocks_of_the_hpack_encoder_decode_as_hpack_decodes_them(seed: int, huffman: bool) -> None:
    rng = random.Random(seed * 2 + huffman)
    encoder = hpack.Encoder()
    theirs = hpack.Decoder()
    ours = Decoder()  # through the cache
    plain = Decoder()  # never the cache
    recent: list[list[Header]] = []
    for _ in range(300):
        if rng.random() < 0.08:
            # Size updates, sometimes several before the next block (the smallest, then the last).
            # (hpack's encoder forgets a pending update when it is set to the same size again.)
            for _ in range(rng.randrange(1, 3)):
                encoder.header_table_size = rng.choice(
                    [size for size in (0, 1, 64, 256, 1000, 4096) if size != encoder.header_table_size]
                )
        if recent and rng.random() < 0.4:
            headers = rng.choice(recent)  # the same list again: cache hits when it was static-only
        else:
            headers = random_headers(rng)
            recent = [*recent[-7:], headers]
        fields = [(name, value, True) if rng.random() < 0.1 else (name, value) for name, value in headers]
        block = encoder.encode(fields, huffman=huffman)
        expected = reference(block, theirs)
        assert expected == headers
        assert ours.decode(block) == expected
        assert uncached(plain, block) == expected
        assert ours.table_entries() == plain.table_entries()
        assert ours.table_size == plain.table_size == theirs.header_table._current_size
        assert ours.table_entries() == [(bytes(n), bytes(v)) for n, v in theirs.header_table.dynamic_entries]


def test_static_only_blocks_replay_their_inserts_into_a_changing_table() -> None:
    # Literals with incremental indexing and static names only (as nginx sends them),
    # between blocks that change the table (inserts, evictions, size updates).
    rng = random.Random(7)
    encoder = Encoder()

    def static_only(headers: list[Header]) -> bytes:
        out = b""
        for name, value in headers:
            out += h2hpack._integer(h2hpack._first_static_index(name), 6, 0x40)
            out += h2hpack._integer(len(value), 7, 0) + value
        return out

    statics = [name for name in h2hpack._STATIC_NAMES[1:]]
    fixed = [
        static_only(
            [
                (rng.choice(statics), bytes(rng.randrange(256) for _ in range(rng.randrange(0, 90))))
                for _ in range(rng.randrange(1, 6))
            ]
        )
        for _ in range(6)
    ]
    ours, plain = Decoder(max_table_size=512), Decoder(max_table_size=512)
    for step in range(400):
        if rng.random() < 0.5:
            block = rng.choice(fixed)
        elif rng.random() < 0.2:
            block = h2hpack._integer(rng.choice((0, 100, 300, 512)), 5, 0x20) + encoder.encode([(b"x", b"y")])
        elif rng.random() < 0.5 and plain.table_entries():
            block = h2hpack._integer(62 + rng.randrange(len(plain.table_entries())), 7, 0x80)
        else:
            block = static_only(
                [(rng.choice(statics), bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600))))]
            )
        assert ours.decode(block) == uncached(plain, block), step
        assert ours.table_entries() == plain.table_entries(), step
        assert (ours.table_size, ours.table_max_size) == (plain.table_size, plain.table_max_size), step
    assert all(block in h2hpack._block_cache for block in fixed)


def test_our_blocks_decode_back_exactly() -> None:
    rng = random.Random(11)
    encoder = Encoder()
    theirs = hpack.Decoder()
    for _ in range(500):
        headers = random_headers(rng)
        block = encoder.encode(headers)
        assert reference(block, theirs) == headers
        assert Decoder().decode(block) == headers
        # Never the dynamic table: nothing is ever inserted on the peer's side.
        assert theirs.header_table._current_size == 0


def test_what_the_encoder_sends() -> None:
    encoder = Encoder()
    assert encoder.encode([(b":method", b"GET"), (b":method", b"POST"), (b":path", b"/")]) == b"\x82\x83\x84"
    assert encoder.encode([(b":scheme", b"http"), (b":scheme", b"https")]) == b"\x86\x87"
    # A static name, literal without indexing, raw value.
    assert encoder.encode([(b":path", b"/a")]) == b"\x04\x02/a"
    assert encoder.encode([(b"user-agent", b"x")]) == b"\x0f\x2b\x01x"  # index 58 = 15 + 43
    assert encoder.encode([(b"x-id", b"1")]) == b"\x00\x04x-id\x011"
    # Credentials as never indexed, even when the static table has the whole field.
    assert encoder.encode([(b"authorization", b"k")]) == b"\x1f\x08\x01k"  # index 23
    assert encoder.encode([(b"cookie", b"")]) == b"\x1f\x11\x00"  # index 32, not the indexed field 0xa0
    assert encoder.encode([(b"set-cookie", b"a")]) == b"\x1f\x28\x01a"
    assert encoder.encode([(b"proxy-authorization", b"a")]) == b"\x1f\x22\x01a"
    # Long names and values: the 7-bit length prefix continues.
    assert encoder.encode([(b"x-v", b"v" * 127)]) == b"\x00\x03x-v\x7f\x00" + b"v" * 127
    long_name = b"\x00\x7f\xad\x01" + b"n" * 300  # 300 = 127 + 173
    long_value = b"\x7f\xe9\x06" + b"v" * 1000  # 1000 = 127 + 873 = 127 + 0x69 + (6 << 7)
    assert encoder.encode([(b"n" * 300, b"v" * 1000)]) == long_name + long_value
    theirs = hpack.Decoder()
    decoded = list(theirs.decode(encoder.encode([(b"authorization", b"k"), (b"x-id", b"1")]), raw=True))
    assert isinstance(decoded[0], hpack.NeverIndexedHeaderTuple)
    assert not isinstance(decoded[1], hpack.NeverIndexedHeaderTuple)


# ------------------------------------------------------------------ malformed blocks


def _huffman_bits(bits: str) -> bytes:
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def _code(symbol: int) -> str:
    return format(REQUEST_CODES[symbol], f"0{REQUEST_CODES_LENGTH[symbol]}b")


A = _code(ord("a"))  # 5 bits
BAD_HUFFMAN = {
    "padding of zeros": _huffman_bits(A + "000"),
    "padding with a zero": _huffman_bits(A + "101"),
    "padding over 7 bits": _huffman_bits(A + "1" * 11),
    "a byte of padding alone": _huffman_bits("1" * 8),
    "EOS": _huffman_bits(_code(256) + "11"),
    "EOS after a symbol": _huffman_bits(A + _code(256) + "1" * 5),
}

MALFORMED = {
    "truncated integer": b"\xff",
    "truncated integer after a continuation": b"\xff\x80",
    "overlong integer": b"\xff" + b"\x80" * 10 + b"\x01",
    "integer above 2**32": b"\xff\xff\xff\xff\xff\x0f",
    "index 0": b"\x80",
    "index beyond the table": b"\xbe",
    "index far beyond the table": b"\xff\x80\x01",
    "name index beyond the table": b"\x7e\x01a",
    "size update above the maximum": h2hpack._integer(4097, 5, 0x20),
    "size update after a field": b"\x82\x20",
    "size update after a literal": b"\x04\x01a\x3f\xe1\x1f",
    "string past the end": b"\x00\x05ab",
    "value past the end": b"\x40\x01a\x05ab",
    "long string length past the end": b"\x04\x7f\x81\x01" + b"a" * 200,
    "no value": b"\x04",
    "no name": b"\x00",
    "truncated string length": b"\x04\x7f",
    **{f"Huffman: {label}": b"\x04" + bytes((0x80 | len(coded),)) + coded for label, coded in BAD_HUFFMAN.items()},
}


@pytest.mark.parametrize("block", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_blocks_are_compression_errors(block: bytes) -> None:
    with pytest.raises(HPACKError):
        Decoder().decode(block)
    # Behind a valid field, and twice (nothing of it was cached).
    for _ in range(2):
        with pytest.raises(HPACKError):
            Decoder().decode(b"\x88" + block if block[0] & 0xE0 != 0x20 else block)


def test_size_updates_at_the_start_several_in_a_row() -> None:
    decoder = Decoder(max_table_size=4096)
    decoder.decode(b"\x40\x01a\x01b")
    assert decoder.decode(b"\x20" + h2hpack._integer(4096, 5, 0x20) + b"\x82") == [(b":method", b"GET")]
    assert decoder.table_entries() == [] and decoder.table_max_size == 4096
    assert decoder.decode(h2hpack._integer(4096, 5, 0x20)) == []  # the maximum itself is allowed


@pytest.mark.parametrize("coded", BAD_HUFFMAN.values(), ids=BAD_HUFFMAN.keys())
def test_decode_huffman_is_strict_by_itself(coded: bytes) -> None:
    with pytest.raises(hpack.HPACKDecodingError):
        decode_huffman(coded)


_CODES = {_code(symbol): symbol for symbol in range(257)}


def _strict_huffman(coded: bytes) -> bytes | None:
    """RFC 7541 §5.2 read bit by bit: None for a string it rejects."""
    codes = _CODES
    out = bytearray()
    pending = ""
    for bit in "".join(format(byte, "08b") for byte in coded):
        pending += bit
        symbol = codes.get(pending)
        if symbol is not None:
            if symbol == 256:
                return None
            out.append(symbol)
            pending = ""
    if len(pending) > 7 or "0" in pending:
        return None
    return bytes(out)


def test_decode_huffman_agrees_with_the_rfc_bit_by_bit() -> None:
    rng = random.Random(5)
    samples: list[bytes] = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6))) for _ in range(3000)]
    # Valid strings with their last bytes changed: near the padding rules.
    for _ in range(2000):
        coded = bytearray(
            HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(
                bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
            )
        )
        coded[-1] ^= rng.randrange(1, 256) if rng.random() < 0.7 else 0
        if rng.random() < 0.2:
            coded.append(0xFF)
        samples.append(bytes(coded))
    for sample in samples:
        expected = _strict_huffman(sample)
        try:
            got: bytes | None = decode_huffman(sample)
        except hpack.HPACKDecodingError:
            got = None
        assert got == expected, sample


def _valid_blocks(rng: random.Random) -> list[bytes]:
    encoder = hpack.Encoder()
    blocks = []
    for _ in range(200):
        if rng.random() < 0.1:
            encoder.header_table_size = rng.choice(
                [size for size in (0, 256, 4096) if size != encoder.header_table_size]
            )
        blocks.append(encoder.encode(random_headers(rng), huffman=rng.random() < 0.5))
    return [*blocks, NGINX_BLOCK, *C3, *C4, *C5, *C6]


def test_garbage_is_only_ever_a_compression_error() -> None:
    rng = random.Random(3)
    valid = _valid_blocks(rng)
    survivor = Decoder(max_header_list_size=1 << 20)  # one connection across all of them, while it lasts
    for i in range(4000):
        if i % 2:
            block = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        else:
            mutated = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                where = rng.randrange(len(mutated) + 1)
                action = rng.random()
                if action < 0.4 and where < len(mutated):
                    mutated[where] = rng.randrange(256)
                elif action < 0.6:
                    mutated.insert(where, rng.randrange(256))
                elif action < 0.8:
                    del mutated[where:]
                elif where < len(mutated):
                    del mutated[where]
            block = bytes(mutated)
        for decoder in (Decoder(max_table_size=256, max_header_list_size=1 << 20), survivor):
            try:
                decoder.decode(block)
            except HPACKError:
                if decoder is survivor:
                    survivor = Decoder(max_header_list_size=1 << 20)
            except HeaderListTooLarge:
                pass
            # Anything else escapes and fails the test.


# ------------------------------------------------------------------ header list size


def test_a_header_list_too_large_is_reported_after_the_table_was_updated() -> None:
    decoder = Decoder(max_header_list_size=110)
    big = b"\x40\x05x-big\x40" + b"v" * 64 + b"\x40\x03x-a\x01a"  # 101 + 36 bytes by §6.5.2's count
    for attempt in range(2):  # decoded, then from the cache
        with pytest.raises(HeaderListTooLarge):
            decoder.decode(big)
        assert decoder.table_entries()[:2] == [(b"x-a", b"a"), (b"x-big", b"v" * 64)], attempt
        assert big in h2hpack._block_cache
        # The connection goes on in sync: the next block indexes what the large one inserted.
        assert decoder.decode(b"\xbf") == [(b"x-big", b"v" * 64)]
        assert decoder.decode(b"\xbe") == [(b"x-a", b"a")]
    # Exactly the limit passes.
    assert Decoder(max_header_list_size=32 + 3 + 1).decode(b"\x00\x03x-a\x01a") == [(b"x-a", b"a")]
    with pytest.raises(HeaderListTooLarge):
        Decoder(max_header_list_size=32 + 3).decode(b"\x00\x03x-a\x01a")


def test_the_limit_is_the_decoders_own_on_a_cache_hit() -> None:
    block = b"\x00\x03x-a\x01a"
    assert Decoder().decode(block) == [(b"x-a", b"a")]
    with pytest.raises(HeaderListTooLarge):
        Decoder(max_header_list_size=10).decode(block)


# ------------------------------------------------------------------ the block cache


def test_each_decode_returns_a_list_of_its_own() -> None:
    decoder = Decoder()
    first = decoder.decode(NGINX_BLOCK)
    first.append((b"x", b"y"))
    second = decoder.decode(NGINX_BLOCK)
    assert (b"x", b"y") not in second
    second.clear()
    assert len(decoder.decode(NGINX_BLOCK)) == 8


def test_what_is_cached_and_what_is_not() -> None:
    decoder = Decoder()
    decoder.decode(b"\x40\x01a\x01b")
    assert b"\x40\x01a\x01b" in h2hpack._block_cache
    decoder.decode(b"\xbe")  # a dynamic entry
    decoder.decode(b"\x7e\x01c")  # a dynamic entry's name
    decoder.decode(b"\x3f\xe1\x1f\x82")  # a size update
    large = b"\x00\x01x" + h2hpack._integer(4200, 7, 0) + b"v" * 4200
    decoder.decode(large)
    assert set(h2hpack._block_cache) == {b"\x40\x01a\x01b"}


def test_the_cache_stays_bounded() -> None:
    decoder = Decoder()
    for i in range(3 * h2hpack._BLOCK_CACHE_ENTRIES):
        block = b"\x0f\x12" + h2hpack._integer(len(str(i)), 7, 0) + str(i).encode()
        assert decoder.decode(block) == [(b"date", str(i).encode())]
        assert len(h2hpack._block_cache) <= h2hpack._BLOCK_CACHE_ENTRIES
    # The newest stayed, the oldest left.
    assert b"\x0f\x12\x010" not in h2hpack._block_cache
    assert len(h2hpack._block_cache) == h2hpack._BLOCK_CACHE_ENTRIES
    for i in range(3 * h2hpack._HUFFMAN_CACHE_ENTRIES):
        coded = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(str(i).encode())
        decoder.decode(b"\x0f\x12" + bytes((0x80 | len(coded),)) + coded)
        assert len(h2hpack._huffman_cache) <= h2hpack._HUFFMAN_CACHE_ENTRIES
