"""Each page's request to a callback URL, built from the URL parsed once (PageRequests).
Imported through client, as transport is, after client's imports have left out of httpx
the parts that puller never uses (imports.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx


class PageRequests:
    """Each page's request to one callback URL: `requests(query)` is the POST of the body
    to the URL with the page's query appended, with the given headers and those httpx
    gives a request (Host, Content-Length): what `httpx.Request(url, content=body, ...)`
    makes of the URL's text, built without parsing it.

    Only the query changes from page to page, and httpx parses and checks a URL's text
    anew for each request, then prepares its headers from the body: ~50 µs of a ~0.5 ms
    request at page size 50, best of 20,000 (~0.1 ms in a loop of requests). So the URL
    is parsed once, each page's query is put in its parsed form as it is (urlencode's
    text is what httpx's parsing makes of it: letters, digits, `-._~%+=&`), and the body
    and headers are prepared once. httpx has no public way to build a URL from its parsed
    form (`URL._uri_reference`, a NamedTuple, in httpx 0.28); where that is missing, or a
    page's URL so built differs from the one parsed from the text (checked once, here),
    each page's URL is parsed from its text as before.
    """

    _PROBE = "page_size=100&cursor=a%2Fb+c~%25"  # as urlencode writes a cursor "a/b c~%"

    def __init__(self, url: str, *, body: bytes, headers: httpx.Headers,
                 extensions: dict[str, Any]) -> None:
        # The page's parameters are appended to the URL's text, encoded as httpx encodes
        # `params`: httpx's `params=` would replace a query the URL has of its own (a
        # region, a token), and merging them cost ~0.1 ms a page.
        self._text = url
        self._joiner = "&" if urlsplit(url).query else "?"
        self._body = body
        self._extensions = extensions
        first = httpx.Request("POST", url, content=body, headers=headers, extensions=extensions)
        self._headers = first.headers
        self._parsed: Any = getattr(first.url, "_uri_reference", None)  # httpx's parsed form
        own_query = getattr(self._parsed, "query", None)
        self._head = f"{own_query}&" if own_query else ""
        built = self._built(self._PROBE)
        if built is None or \
                built._uri_reference != httpx.URL(self._joined(self._PROBE))._uri_reference:
            self._parsed = None

    @property
    def parses(self) -> bool:
        """Whether each page's URL is parsed from its text (httpx's form is not known)."""
        return self._parsed is None

    def __call__(self, query: str) -> httpx.Request:
        url = self._built(query) or httpx.URL(self._joined(query))
        request = httpx.Request("POST", url, stream=httpx.ByteStream(self._body),
                                headers=self._headers, extensions=self._extensions)
        request.read()  # as `content=` does: the transport sends request.content
        return request

    def _joined(self, query: str) -> str:
        return f"{self._text}{self._joiner}{query}"

    def _built(self, query: str) -> httpx.URL | None:
        """The URL with this query, from the parsed form; None where it is not known."""
        if self._parsed is None:
            return None
        try:
            parsed = self._parsed._replace(query=self._head + query)
        except AttributeError:  # not a NamedTuple: not httpx 0.28's form
            return None
        url = httpx.URL.__new__(httpx.URL)
        url._uri_reference = parsed
        return url
