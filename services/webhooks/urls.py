"""What an endpoint URL may be: http or https, a host, no credentials, no fragment, at most
MAX_URL_CHARS. Parsing only; where the host points is checked in `addresses`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_CHARS = 2048


class InvalidURL(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    scheme: str  # http | https
    host: str  # a name (IDNA-encoded) or an IP literal without brackets
    port: int
    path: str  # path and query, what the request line carries

    @property
    def is_ip_literal(self) -> bool:
        import ipaddress

        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse(url: object) -> Target:
    if not isinstance(url, str) or not url:
        raise InvalidURL("url must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise InvalidURL(f"url is longer than {MAX_URL_CHARS} characters")
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise InvalidURL("url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise InvalidURL(f"url is not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidURL("url must start with https:// or http://")
    if parts.username is not None or parts.password is not None:
        raise InvalidURL("url must not contain credentials (user:password@)")
    if parts.fragment or url.endswith("#"):
        raise InvalidURL("url must not contain a fragment (#...): it is never sent")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidURL("url has no host")
    if port == 0:
        raise InvalidURL("url's port must be 1 to 65535")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise InvalidURL("url's host is not a valid domain name") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path)
