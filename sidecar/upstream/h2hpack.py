"""HPACK (RFC 7541) for our HTTP/2 upstream connections.

The decoder is strict (any malformed block is `HPACKError`, the connection's
COMPRESSION_ERROR) and fast where servers are repetitive: most of them send the
same response header block bytes again and again, with literals whose names come
from the static table. Such a block's header list is a pure function of its bytes
and its effect on the dynamic table is a fixed list of inserts, so it is decoded
once and afterwards only looked up (`_block_cache`) and its inserts replayed.

The encoder never uses the dynamic table: what it sends does not depend on the
table size the peer allows, and there is no encoder state to keep in sync.
Nor does it use Huffman coding: on the links we serve, CPU is dearer than bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman

Header = tuple[bytes, bytes]


class HPACKError(Exception):
    """A header block that cannot be decoded: the connection must end with COMPRESSION_ERROR."""


class HeaderListTooLarge(Exception):
    """The decoded header list exceeds max_header_list_size.  Raised only AFTER the whole
    block was processed, so the dynamic table stays in sync and the connection can go on
    (the caller resets only that stream)."""


# RFC 7541 Appendix A. Index 0 is never valid (it is rejected before any lookup);
# the placeholder keeps the tuple's indices the RFC's.
_STATIC: tuple[Header, ...] = (
    (b"", b""),
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)
_STATIC_NAMES: tuple[bytes, ...] = tuple(name for name, _ in _STATIC)
_STATIC_LAST = len(_STATIC) - 1  # 61; index 62 is the newest dynamic entry
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1, also RFC 9113 §6.5.2's per-field overhead


def _insert(dynamic: deque[Header], entry: Header, entry_size: int, size: int, max_size: int) -> int:
    """Add ``entry`` to the dynamic table (newest first), evicting as needed; the table's new size."""
    if entry_size > max_size:
        # RFC 7541 §4.4: an entry larger than the table empties it.
        dynamic.clear()
        return 0
    dynamic.appendleft(entry)
    return _evict(dynamic, size + entry_size, max_size)


def _evict(dynamic: deque[Header], size: int, max_size: int) -> int:
    """Drop the oldest entries until the table fits ``max_size`` (RFC 7541 §4.4); its new size."""
    while size > max_size:
        name, value = dynamic.pop()
        size -= len(name) + len(value) + _ENTRY_OVERHEAD
    return size


# No integer in a valid block comes near this (indices are small, lengths are
# bounded by the block): a bound keeps a hostile run of continuation bytes from
# building a huge int, and five continuation bytes carry more than 32 bits.
_MAX_INTEGER = 1 << 32
_MAX_CONTINUATION_SHIFT = 7 * 5

# Blocks decoded with no dynamic-table reference and no size update, by their
# bytes: (header list, inserts as (entry, entry size), header list size). Shared
# by every decoder: the result is a function of the bytes alone, and connections
# to one upstream all see its same few blocks. Oldest out first when full, so a
# block that stopped recurring (yesterday's `date`) leaves by itself.
_block_cache: dict[bytes, tuple[tuple[Header, ...], tuple[tuple[Header, int], ...], int]] = {}
_BLOCK_CACHE_ENTRIES = 256
_BLOCK_CACHE_MAX_BYTES = 4096

# Huffman-decoded strings, by their coded bytes: when a block misses the cache
# (its `date` changed) its other values are usually the ones seen before, and the
# Huffman decoder runs a Python loop per nibble.
_huffman_cache: dict[bytes, bytes] = {}
_HUFFMAN_CACHE_ENTRIES = 1024
_HUFFMAN_CACHE_MAX_BYTES = 256


def _continued_integer(block: bytes, pos: int, value: int) -> tuple[int, int]:
    """The rest of an integer whose prefix was all 1s (`value`); `pos` is at its first continuation byte."""
    n = len(block)
    shift = 0
    while True:
        if pos >= n:
            raise HPACKError("header block ends inside an integer")
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift >= _MAX_CONTINUATION_SHIFT:
            raise HPACKError("integer with too many continuation bytes")
    if value > _MAX_INTEGER:
        raise HPACKError("integer too large")
    return value, pos


def _huffman(coded: bytes) -> bytes:
    text = _huffman_cache.get(coded)
    if text is None:
        try:
            text = decode_huffman(coded)
        except HPACKDecodingError:
            raise HPACKError("invalid Huffman-coded string") from None
        if len(coded) <= _HUFFMAN_CACHE_MAX_BYTES:
            if len(_huffman_cache) >= _HUFFMAN_CACHE_ENTRIES:
                _huffman_cache.pop(next(iter(_huffman_cache)), None)
            _huffman_cache[coded] = text
    return text


def _string(block: bytes, pos: int, n: int) -> tuple[bytes, int]:
    """The string literal at `pos` (RFC 7541 §5.2) and the position after it."""
    if pos >= n:
        raise HPACKError("header block ends before a string literal")
    first = block[pos]
    length = first & 0x7F
    pos += 1
    if length == 0x7F:
        length, pos = _continued_integer(block, pos, length)
    end = pos + length
    if end > n:
        raise HPACKError("string literal runs past the end of the header block")
    if first & 0x80:
        return _huffman(block[pos:end]), end
    return block[pos:end], end


class Decoder:
    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 65536) -> None:
        # The dynamic table, newest first: index 62 is _dynamic[0].
        self._dynamic: deque[Header] = deque()
        self._size = 0
        # The table's current maximum (what size updates set) and its bound: the
        # SETTINGS_HEADER_TABLE_SIZE we advertise.
        self._max_size = max_table_size
        self._size_limit = max_table_size
        self._max_list_size = max_header_list_size

    @property
    def table_size(self) -> int:
        """The dynamic table's size as RFC 7541 §4.1 counts it."""
        return self._size

    @property
    def table_max_size(self) -> int:
        """The dynamic table's current maximum size (the last size update, else the advertised one)."""
        return self._max_size

    def table_entries(self) -> list[Header]:
        """The dynamic table, newest (index 62) first."""
        return list(self._dynamic)

    def decode(self, block: bytes) -> list[Header]:
        if type(block) is not bytes:
            block = bytes(block)  # the cache needs a hashable key
        hit = _block_cache.get(block)
        if hit is None:
            return self._decode(block, True)
        headers, inserts, list_size = hit
        if inserts:
            dynamic = self._dynamic
            size = self._size
            max_size = self._max_size
            for entry, entry_size in inserts:
                size = _insert(dynamic, entry, entry_size, size, max_size)
            self._size = size
        if list_size > self._max_list_size:
            raise HeaderListTooLarge(f"header list of {list_size} bytes")
        return list(headers)

    def _decode(self, block: bytes, store: bool) -> list[Header]:
        n = len(block)
        dynamic = self._dynamic
        size = self._size
        max_size = self._max_size
        static = _STATIC
        static_names = _STATIC_NAMES
        headers: list[Header] = []
        inserts: list[tuple[Header, int]] = []
        list_size = 0
        # Whether the result depends on nothing but the bytes (cacheable).
        pure = True
        pos = 0
        while pos < n:
            first = block[pos]
            pos += 1
            if first & 0x80:  # indexed field, §6.1
                index = first & 0x7F
                if index == 0x7F:
                    index, pos = _continued_integer(block, pos, index)
                elif index == 0:
                    raise HPACKError("indexed field with index 0")
                if index <= _STATIC_LAST:
                    header = static[index]
                else:
                    pure = False
                    index -= _STATIC_LAST + 1
                    if index >= len(dynamic):
                        raise HPACKError("index beyond the dynamic table")
                    header = dynamic[index]
                headers.append(header)
                list_size += len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
                continue
            if first & 0x40:  # literal with incremental indexing, §6.2.1
                mask = 0x3F
            elif first & 0x20:  # dynamic table size update, §6.3
                if headers:
                    raise HPACKError("dynamic table size update after a header field")
                pure = False
                max_size = first & 0x1F
                if max_size == 0x1F:
                    max_size, pos = _continued_integer(block, pos, max_size)
                if max_size > self._size_limit:
                    raise HPACKError(f"dynamic table size update to {max_size}, above {self._size_limit}")
                size = _evict(dynamic, size, max_size)
                continue
            else:  # literal without indexing (0000) or never indexed (0001), §6.2.2-3
                mask = 0x0F
            index = first & mask
            if index == mask:
                index, pos = _continued_integer(block, pos, index)
            if index == 0:
                name, pos = _string(block, pos, n)
            elif index <= _STATIC_LAST:
                name = static_names[index]
            else:
                pure = False
                index -= _STATIC_LAST + 1
                if index >= len(dynamic):
                    raise HPACKError("name index beyond the dynamic table")
                name = dynamic[index][0]
            value, pos = _string(block, pos, n)
            header = (name, value)
            headers.append(header)
            entry_size = len(name) + len(value) + _ENTRY_OVERHEAD
            list_size += entry_size
            if mask == 0x3F:
                inserts.append((header, entry_size))
                size = _insert(dynamic, header, entry_size, size, max_size)
        self._size = size
        self._max_size = max_size
        if pure and store and n <= _BLOCK_CACHE_MAX_BYTES:
            if len(_block_cache) >= _BLOCK_CACHE_ENTRIES:
                _block_cache.pop(next(iter(_block_cache)), None)
            _block_cache[block] = (tuple(headers), tuple(inserts), list_size)
        if list_size > self._max_list_size:
            raise HeaderListTooLarge(f"header list of {list_size} bytes")
        return headers


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1: `value` in a `prefix_bits`-bit prefix, `first` holding the representation's top bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Lengths of raw (not Huffman-coded) string literals below the 7-bit prefix's limit.
_SHORT_LENGTHS: tuple[bytes, ...] = tuple(bytes((n,)) for n in range(0x7F))

# Fields sent as "never indexed" (§6.2.3), so that no intermediary re-encoding
# them puts credentials in a table that other requests could probe (§7.1.3).
_SENSITIVE = frozenset((b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"))


def _first_static_index(name: bytes) -> int:
    for index in range(1, _STATIC_LAST + 1):
        if _STATIC_NAMES[index] == name:
            return index
    return 0


# Fields that are a whole static entry, as their indexed representation (§6.1);
# sensitive names are left out: an indexed field cannot say "never index".
_FULL_MATCHES: dict[Header, bytes] = {}
for _index in range(_STATIC_LAST, 0, -1):  # backwards: the first index wins
    if _STATIC[_index][0] not in _SENSITIVE:
        _FULL_MATCHES[_STATIC[_index]] = _integer(_index, 7, 0x80)
del _index

_NAME_CACHE_ENTRIES = 1024


class Encoder:
    def __init__(self) -> None:
        # A field's representation up to its value's length, by name.
        self._prefixes: dict[bytes, bytes] = {}

    def _prefix(self, name: bytes) -> bytes:
        first = 0x10 if name.lower() in _SENSITIVE else 0x00
        index = _first_static_index(name)
        if index:
            prefix = _integer(index, 4, first)
        else:
            prefix = bytes((first,)) + _integer(len(name), 7, 0) + name
        if len(self._prefixes) >= _NAME_CACHE_ENTRIES:
            self._prefixes.clear()
        self._prefixes[name] = prefix
        return prefix

    def encode(self, headers: Iterable[Header]) -> bytes:
        out: list[bytes] = []
        append = out.append
        full = _FULL_MATCHES
        prefixes = self._prefixes
        short = _SHORT_LENGTHS
        for name, value in headers:
            indexed = full.get((name, value))
            if indexed is not None:
                append(indexed)
                continue
            prefix = prefixes.get(name)
            if prefix is None:
                prefix = self._prefix(name)
            append(prefix)
            length = len(value)
            append(short[length] if length < 0x7F else _integer(length, 7, 0))
            append(value)
        return b"".join(out)
