"""page_requests.PageRequests: each page's request is the one httpx makes of the URL's text."""

from __future__ import annotations

from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from puller import protocol
from puller.domain import PageRequest
from puller.page_requests import PageRequests

BODY = protocol.request_body("shop.example.com")
HEADERS = httpx.Headers({"User-Agent": "puller/0.1", "X-Api-Key": "k", "Content-Type":
                         "application/json"})
EXTENSIONS = {"timeout": httpx.Timeout(30.0, connect=10.0).as_dict()}
URLS = [
    "http://127.0.0.1:8080/b0/customers",
    "https://shop.example.com/export/customers",
    "https://shop.example.com/x?region=eu&token=a%2Fb",  # a query of the URL's own
    "http://[::1]:8081/p%20q/r",
    "https://bücher.example/callback",  # an IDNA host
    "https://shop.example.com:443/default-port",
]


def _parsed(url: str, query: str) -> httpx.Request:
    """The request as httpx makes it from the URL's text, as puller sent it before."""
    joiner = "&" if "?" in url else "?"
    return httpx.Request("POST", f"{url}{joiner}{query}", content=BODY, headers=HEADERS,
                         extensions=EXTENSIONS)


def _same(built: httpx.Request, parsed: httpx.Request) -> None:
    assert str(built.url) == str(parsed.url)
    assert built.url.raw_path == parsed.url.raw_path
    assert built.url.params == parsed.url.params
    assert built.headers.raw == parsed.headers.raw  # Host and Content-Length included
    assert built.content == parsed.content
    assert built.extensions == parsed.extensions


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("request_", [
    PageRequest(number=1, page_size=50, page=1),
    PageRequest(number=7, page_size=500, page=7),
    PageRequest(number=2, page_size=100, cursor="eyJvIjogMTAwfQ=="),
    PageRequest(number=3, page_size=100, cursor="a/b c~%&=+?#ü"),
], ids=["page-1", "page-7", "cursor-base64", "cursor-odd"])
def test_each_page_is_the_request_parsing_its_url_gives(url: str,
                                                        request_: PageRequest) -> None:
    requests = PageRequests(url, body=BODY, headers=HEADERS, extensions=EXTENSIONS)
    assert not requests.parses, "httpx 0.28's parsed URL form is used, as measured"
    query = urlencode(protocol.request_params(request_))
    _same(requests(query), _parsed(url, query))


@given(cursor=st.text(max_size=40), page_size=st.integers(min_value=1, max_value=10_000))
def test_any_cursor_gives_the_parsed_request(cursor: str, page_size: int) -> None:
    query = urlencode(protocol.request_params(
        PageRequest(number=1, page_size=page_size, cursor=cursor)))
    for url in URLS[:3]:
        requests = PageRequests(url, body=BODY, headers=HEADERS, extensions=EXTENSIONS)
        _same(requests(query), _parsed(url, query))


@pytest.mark.parametrize("url", ["http://h.example/cb?", "http://h.example/cb#part"])
def test_a_url_the_built_form_would_not_match_is_parsed_for_each_page(url: str) -> None:
    """A URL ending in `?`, or with a fragment: what httpx parses from the text differs
    from the parsed URL with a query put in, so each page's URL is parsed, as before."""
    requests = PageRequests(url, body=BODY, headers=HEADERS, extensions=EXTENSIONS)
    assert requests.parses
    query = "page_size=50&page=2"
    built = requests(query)
    assert str(built.url) == f"{url}?{query}"
    assert built.headers.raw == _parsed(url, query).headers.raw
