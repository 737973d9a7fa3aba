"""`allow.http`: which origins a flow may call.

Patterns name origins (`scheme://host[:port]`), never URLs, because the check guards where a connection
goes, not which path it asks for. A URL is judged by the host it would actually connect to, so anything
two URL parsers could read differently (userinfo, backslashes, percent-escapes or odd IPv4 spellings in
the host, control characters) is refused rather than guessed at: deny is the safe answer.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Iterable, Optional, Union
from urllib.parse import quote, urlsplit

from pydantic import AfterValidator

from wasmflow.fields import Section

DEFAULT_PORTS = {"http": 80, "https": 443}
ANY = "*"
EXPECTED = "expected scheme://host[:port] such as https://api.github.com or https://*.example.com"

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# A last label that URL parsers (and inet_aton) read as a number makes the host an IPv4 address.
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_UNSAFE_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_URL_SAFE = "/%:@!$&'()*+,;=?~[]"  # left as they are in a path or query: only other characters are encoded


@dataclass(frozen=True)
class AllowPattern:
    """One parsed `allow.http` entry; `str()` gives its canonical text."""

    scheme: str  # "http", "https" or "*"
    host: str  # lowercase ASCII name, IPv4, IPv6 without brackets, or "*" for any host
    subdomains: bool  # "*.example.com": hosts strictly below `host`, not `host` itself
    port: Union[int, str, None]  # a number, "*" for any, None for the scheme's default

    def matches(self, scheme: str, host: str, port: int) -> bool:
        """Whether a connection to (scheme, normalised host, port) is allowed by this entry."""
        if self.scheme != ANY and self.scheme != scheme:
            return False
        if self.port != ANY and port != (DEFAULT_PORTS.get(scheme) if self.port is None else self.port):
            return False
        if self.host == ANY:
            return True
        if self.subdomains:
            return host.endswith("." + self.host)
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.subdomains:
            host = "*." + host
        port = "" if self.port is None else f":{self.port}"
        return f"{self.scheme}://{host}{port}"


def parse_pattern(text: str) -> AllowPattern:
    """Parse one `allow.http` entry; the ValueError says the expected form and how to fix the entry."""

    def fail(reason: str) -> ValueError:
        return ValueError(f"{EXPECTED}, got {text!r}: {reason}")

    if not isinstance(text, str):
        raise ValueError(f"{EXPECTED}, got {text!r}")
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise fail("the scheme is missing (write https://... or *://... for http and https)")
    scheme = scheme.lower()
    if scheme != ANY and scheme not in DEFAULT_PORTS:
        raise fail(f"unsupported scheme {scheme!r} (use http, https or *)")
    authority, tail = re.match(r"([^/?#]*)(.*)", rest, re.S).groups()  # type: ignore[union-attr]
    extras = [what for present, what in (("@" in authority, "userinfo"), ("/" in tail, "path"),
                                         ("?" in tail, "query"), ("#" in tail, "fragment")) if present]
    if extras:
        origin = authority.rpartition("@")[2]
        named = " and ".join(extras) if len(extras) < 3 else ", ".join(extras[:-1]) + " and " + extras[-1]
        raise fail(f"patterns name origins, not URLs: drop the {named} (write {scheme}://{origin})")
    rest = authority
    host, port_text = _split_host_port(rest, fail)
    port: Union[int, str, None] = None
    if port_text is not None:
        if port_text == ANY:
            port = ANY
        elif re.fullmatch(r"[0-9]{1,5}", port_text) and 0 < int(port_text) < 65536:
            port = int(port_text)
        else:
            raise fail(f"port must be a number from 1 to 65535 or *, got {port_text!r}")
    if host == ANY:
        return AllowPattern(scheme, ANY, False, port)
    subdomains = host.startswith("*.")
    if subdomains:
        host = host[2:]
    if ANY in host:
        raise fail("* may only stand for the whole host or its leftmost labels, as in *.example.com")
    try:
        normal = _normalize_host(host)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if subdomains and _is_ip(normal):
        raise fail("*. wildcards apply to DNS names, not IP addresses (use the address itself)")
    return AllowPattern(scheme, normal, subdomains, port)


class HttpAllowList:
    """The `allow.http` entries of one flow; empty means no outbound HTTP at all."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[AllowPattern, ...] = tuple(parse_pattern(p) for p in patterns)

    def allows(self, url: str) -> bool:
        """Whether the flow may send a request to `url`; any URL that cannot be judged safely is refused."""
        target = _connection_target(url)
        return target is not None and any(p.matches(*target) for p in self.patterns)

    def connect_url(self, url: str) -> Optional[str]:
        """The URL to send for `url` if the flow may call it, else None.

        Same path and query, but the host is the normalised one that was checked: an HTTP client that
        re-encoded the name itself (IDNA 2008 rather than the codec used here) could otherwise resolve
        another name than the one allowed. Non-ASCII in the path or query is percent-encoded; escapes
        already there are kept as they are. The fragment, never sent, is dropped.
        """
        target = _connection_target(url)
        if target is None or not any(p.matches(*target) for p in self.patterns):
            return None
        scheme, host, port = target
        parts = urlsplit(url)
        path = quote(parts.path or "/", safe=_URL_SAFE)
        query = "?" + quote(parts.query, safe=_URL_SAFE) if parts.query else ""
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}{path}{query}"

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"HttpAllowList({[str(p) for p in self.patterns]!r})"


def _split_host_port(rest: str, fail) -> tuple[str, Optional[str]]:  # type: ignore[no-untyped-def]
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise fail("an IPv6 address needs a closing ], as in http://[::1]:8080")
        host, after = rest[1:end], rest[end + 1 :]
        if after and not after.startswith(":"):
            raise fail(f"unexpected {after!r} after the IPv6 address")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise fail(f"{host!r} is not an IPv6 address") from None
        return host, (after[1:] if after else None)
    if rest.count(":") > 1:
        raise fail("an IPv6 address goes in brackets, as in http://[::1]:8080")
    host, sep, port = rest.partition(":")
    if not host:
        raise fail("the host is missing")
    return host, (port if sep else None)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _normalize_host(host: str) -> str:
    """Lowercase ASCII (IDNA) form of a DNS name, or the canonical text of an IP address.

    Both patterns and URLs go through this, so they compare equal exactly when they name the same host.
    The IDNA codec is the one the socket layer uses to resolve a name, so the name checked is the one
    connected to.
    """
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    if host.endswith("."):
        host = host[:-1]
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"{host!r} is not a valid host name") from None
    labels = ascii_host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            return str(ipaddress.IPv4Address(ascii_host))
        except ValueError:
            raise ValueError(f"{host!r} is neither a host name nor a dotted IPv4 address like 10.0.0.1") from None
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{host!r} is not a valid host name")
    return ascii_host


def _connection_target(url: str) -> Optional[tuple[str, str, int]]:
    """(scheme, normalised host, port) that a request to `url` connects to, or None if unclear."""
    if not isinstance(url, str) or _UNSAFE_URL_CHARS.search(url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or "@" in parts.netloc or "%" in parts.netloc or not parts.hostname:
        return None
    try:
        host = _normalize_host(parts.hostname)
    except ValueError:
        return None
    return scheme, host, DEFAULT_PORTS[scheme] if port is None else port


def _check_pattern(value: str) -> str:
    parse_pattern(value)  # raises ValueError with the expected form
    return value


class HttpAllow(Section):
    """The capability's part of a flow's `allow:` (flows/model.py's `Allow` is made of such parts)."""

    http: list[Annotated[str, AfterValidator(_check_pattern)]] = []  # scheme://host[:port], with * wildcards
