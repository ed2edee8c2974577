"""The upstream side: one bounded connection pool per upstream, over httpcore connections.

``poolstate`` decides (pure), ``pool`` does the I/O, ``stream`` is the pooled
response body; ``netio``, ``h2streams`` and ``h2deadlines`` are what the
pool adds under and around httpcore's protocol code.
"""
