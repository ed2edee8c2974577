"""The upstream side: one bounded connection pool per upstream, over the sidecar's own connections.

``poolstate`` decides (pure), ``pool`` does the I/O, ``stream`` is the pooled
response body; ``h1frame``/``h1conn`` are HTTP/1.1 (llhttp), ``h2core``/
``h2conn`` HTTP/2 with ``h2hpack`` its header coding, ``alpn`` the connection
whose TLS handshake picks one of the two, and ``netio`` the plain-asyncio
network layer under them.
"""
