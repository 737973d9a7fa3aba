"""allow.http patterns: what they parse to, which URLs they let through, and which they must not."""

from __future__ import annotations

import pytest

from wasmflow.host_functions.http_allow import AllowPattern, HttpAllowList, parse_pattern


def allows(patterns: list[str], url: str) -> bool:
    return HttpAllowList(patterns).allows(url)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("https://api.github.com", AllowPattern("https", "api.github.com", False, None)),
        ("HTTPS://API.GitHub.COM:443", AllowPattern("https", "api.github.com", False, 443)),
        ("*://example.com", AllowPattern("*", "example.com", False, None)),
        ("http://127.0.0.1:*", AllowPattern("http", "127.0.0.1", False, "*")),
        ("https://*.example.com", AllowPattern("https", "example.com", True, None)),
        ("http://[::1]:8080", AllowPattern("http", "::1", False, 8080)),
        ("http://[0:0::1]", AllowPattern("http", "::1", False, None)),
        ("*://*:*", AllowPattern("*", "*", False, "*")),
        ("https://bücher.example", AllowPattern("https", "xn--bcher-kva.example", False, None)),
    ],
)
def test_parse_pattern(text: str, expected: AllowPattern) -> None:
    assert parse_pattern(text) == expected


def test_pattern_str_is_canonical_and_parses_back() -> None:
    for text in ("https://*.example.com", "http://[::1]:8080", "*://example.com:*"):
        assert str(parse_pattern(text)) == text
        assert parse_pattern(str(parse_pattern(text))) == parse_pattern(text)


@pytest.mark.parametrize(
    "text, hint",
    [
        ("api.github.com", "scheme is missing"),
        ("ftp://example.com", "unsupported scheme 'ftp'"),
        ("https://api.github.com/", "drop the path (write https://api.github.com)"),
        ("https://api.github.com/repos?x=1", "drop the path and query"),
        ("https://user:pw@example.com", "drop the userinfo (write https://example.com)"),
        ("https://example.com#frag", "drop the fragment"),
        ("https://", "host is missing"),
        ("https://example.com:0", "port must be a number from 1 to 65535 or *"),
        ("https://example.com:70000", "port must be a number"),
        ("https://example.com:http", "port must be a number"),
        ("https://example.com:", "port must be a number"),
        ("https://api*.example.com", "leftmost labels"),
        ("https://api.*.example.com", "leftmost labels"),
        ("https://*.*.example.com", "leftmost labels"),
        ("http://::1", "IPv6 address goes in brackets"),
        ("http://[::1", "closing ]"),
        ("http://[not-v6]:80", "is not an IPv6 address"),
        ("http://[::1]x", "unexpected 'x'"),
        ("https://*.10.0.0.1", "not IP addresses"),
        ("http://1.2.3", "dotted IPv4"),
        ("http://0x7f.1", "dotted IPv4"),
        ("https://exa mple.com", "not a valid host name"),
        ("https://-bad-.com", "not a valid host name"),
        ("https://a..b", "not a valid host name"),
    ],
)
def test_invalid_patterns_say_the_expected_form(text: str, hint: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_pattern(text)
    message = str(info.value)
    assert message.startswith("expected scheme://host[:port] such as https://api.github.com or https://*.example.com")
    assert repr(text) in message
    assert hint in message


def test_an_invalid_entry_fails_the_whole_list() -> None:
    with pytest.raises(ValueError, match="drop the path"):
        HttpAllowList(["https://ok.example.com", "https://bad.example.com/path"])


def test_exact_host_uses_the_default_port_of_the_scheme() -> None:
    patterns = ["https://api.github.com"]
    assert allows(patterns, "https://api.github.com/repos/o/r/pulls?page=2")
    assert allows(patterns, "https://api.github.com:443/")
    assert not allows(patterns, "https://api.github.com:8443/")
    assert not allows(patterns, "http://api.github.com/")
    assert not allows(patterns, "https://github.com/")
    assert not allows(patterns, "https://api.github.com.evil.com/")


def test_explicit_default_port_equals_no_port() -> None:
    assert allows(["https://example.com:443"], "https://example.com/")
    assert allows(["http://example.com:80"], "http://example.com:80/x")
    assert not allows(["http://example.com:80"], "https://example.com/")


def test_any_scheme_takes_the_default_port_of_the_url_scheme() -> None:
    patterns = ["*://example.com"]
    assert allows(patterns, "http://example.com/")
    assert allows(patterns, "https://example.com/")
    assert not allows(patterns, "https://example.com:80/")
    assert not allows(patterns, "http://example.com:8080/")
    assert not allows(patterns, "ftp://example.com/")


def test_any_port() -> None:
    patterns = ["http://127.0.0.1:*"]
    assert allows(patterns, "http://127.0.0.1:8080/health")
    assert allows(patterns, "http://127.0.0.1/")
    assert not allows(patterns, "https://127.0.0.1:8080/")
    assert not allows(patterns, "http://127.0.0.2:8080/")


def test_subdomain_wildcard_excludes_the_bare_domain() -> None:
    patterns = ["https://*.example.com"]
    assert allows(patterns, "https://api.example.com/")
    assert allows(patterns, "https://a.b.example.com/")
    assert not allows(patterns, "https://example.com/")
    assert not allows(patterns, "https://notexample.com/")
    assert not allows(patterns, "https://api.example.com.evil.net/")
    assert not allows(patterns, "https://api.example.com:8443/")
    assert allows(["https://*.example.com", "https://example.com"], "https://example.com/")


def test_host_comparison_ignores_case_and_a_trailing_dot() -> None:
    assert allows(["https://API.Example.com"], "https://api.EXAMPLE.com/")
    assert allows(["https://*.example.com"], "HTTPS://Api.Example.COM/x")
    assert allows(["https://example.com"], "https://example.com./")


def test_ipv6_literals() -> None:
    patterns = ["http://[::1]:8080"]
    assert allows(patterns, "http://[::1]:8080/")
    assert allows(patterns, "http://[0:0:0:0:0:0:0:1]:8080/")
    assert not allows(patterns, "http://[::1]/")
    assert not allows(patterns, "http://[::2]:8080/")
    assert allows(["https://[2001:DB8::1]"], "https://[2001:db8:0::1]/")
    assert not allows(["http://[::1]:*"], "http://127.0.0.1:8080/")


def test_international_names_match_their_ascii_form() -> None:
    assert allows(["https://bücher.example"], "https://xn--bcher-kva.example/")
    assert allows(["https://xn--bcher-kva.example"], "https://BÜCHER.example/")


def test_any_host() -> None:
    assert allows(["https://*"], "https://anything.example.org/")
    assert allows(["https://*"], "https://10.1.2.3/")
    assert not allows(["https://*"], "http://anything.example.org/")


def test_empty_list_allows_nothing() -> None:
    allow_list = HttpAllowList([])
    assert not allow_list
    assert not allow_list.allows("https://example.com/")


@pytest.mark.parametrize(
    "url",
    [
        "https://api.github.com@evil.com/",  # userinfo: the real host is evil.com
        "https://evil.com\\@api.github.com/",  # parsers disagree about backslashes
        "https://user@api.github.com/",  # userinfo is refused even for the right host
        "https://api.github%2ecom/",  # percent-escapes in the host
        "https://api.github.com\t/",
        "https://api.github.com /",
        "https://api.github.com:99999/",
        "https://api.github.com:abc/",
        "api.github.com",
        "//api.github.com/",
        "file:///etc/passwd",
        "",
    ],
)
def test_urls_that_cannot_be_judged_safely_are_refused(url: str) -> None:
    assert not allows(["https://api.github.com", "https://*.github.com"], url)


def test_numeric_host_spellings_do_not_sneak_past_ip_patterns() -> None:
    # inet_aton reads 127.1 and 2130706433 as 127.0.0.1; they are refused, not matched by name.
    patterns = ["http://*:*"]
    assert allows(patterns, "http://127.0.0.1/")
    assert not allows(patterns, "http://127.1/")
    assert not allows(patterns, "http://2130706433/")
    assert not allows(patterns, "http://0x7f.0.0.1/")
