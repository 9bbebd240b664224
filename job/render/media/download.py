"""Downloads from URLs that come from outside (songs for ``cover make URL``, voices for
``cover models add URL``): one guard for both.

* scheme: ``https`` only (``http`` when ``COVER_ALLOW_HTTP_URLS`` is set); no credentials in the URL;
* every address the host name resolves to must be a public unicast address: loopback, private,
  link-local (the cloud metadata address 169.254.169.254 among them), multicast, reserved and
  unspecified addresses are refused, IPv4 and IPv6 alike (IPv4-mapped IPv6 is checked as IPv4).
  The check runs before any connection is made, and again on the address each connection really
  reached (a name that resolves differently the second time gains nothing). Local development and
  the tests may allow named networks (``COVER_URL_ALLOW_NETWORKS``, e.g. ``["127.0.0.1/32"]``);
  the metadata addresses, multicast and unspecified addresses stay refused even then;
* redirects are followed by hand, at most :attr:`UrlPolicy.max_redirects`, each hop checked again;
* a connect timeout, a read timeout, an overall deadline (checked between socket reads, so a server
  trickling a byte at a time is cut off), and a size limit; proxies from the
  environment are ignored (a proxy would reach what the check refuses);
* messages name the URL without its query string, fragment or credentials.

A refused URL is ``input.url_refused``; a failed or too slow download ``input.download_failed``; a
too large one ``input.too_long``. A partial download never stays behind, unless the caller asks to
resume it later (``cover models fetch``: a broken-off download continues with a range request).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from pydantic import BaseModel, Field
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from shared.errors import CoverError, ErrorCode
from shared.settings import Settings

METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
REDIRECTS = {301, 302, 303, 307, 308}
DownloadProgress = Callable[[int, int | None], None]  # (bytes so far, whole size or None)


class UrlPolicy(BaseModel):
    """What a download may reach and how long and large it may be (settings ``COVER_...``)."""

    allow_http: bool = Field(False, description="Also accept plain http URLs.")
    allow_networks: list[IPv4Network | IPv6Network] = Field(
        default_factory=list, description="Networks besides the public internet a URL may reach (development, tests)."
    )
    max_bytes: int = Field(500 * 2**20, gt=0)
    deadline_s: float = Field(300.0, gt=0, description="The whole download, redirects included.")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the next bytes.")
    max_redirects: int = Field(5, ge=0)

    @classmethod
    def from_settings(cls, settings: Settings, max_bytes: int | None = None) -> UrlPolicy:
        return cls.model_validate(
            {
                "allow_http": settings.allow_http_urls,
                "allow_networks": settings.url_allow_networks,
                "max_bytes": max_bytes or settings.max_download_bytes,
                "deadline_s": settings.download_deadline_s,
            }
        )


def is_url(source: str) -> bool:
    """Whether ``source`` is meant as a URL (any ``scheme://``: the guard then decides)."""
    return "://" in source and bool(urlsplit(source).scheme)


def redact(url: str) -> str:
    """The URL as messages show it: scheme, host, port and path only."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_address(address: str, policy: UrlPolicy, url: str) -> None:
    """Refuse an address a download must not reach (see the module's rules)."""
    ip = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES or ip.is_multicast or ip.is_unspecified:
        allowed = False
    else:
        allowed = ip.is_global or any(ip in network for network in policy.allow_networks)
    if not allowed:
        raise CoverError(
            ErrorCode.INPUT_URL_REFUSED, f"{redact(url)} leads to {ip}, an address downloads may not reach"
        )


def check_url(url: str, policy: UrlPolicy) -> None:
    """Scheme, credentials, and every address the host resolves to; before any connection."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CoverError(ErrorCode.INPUT_URL_REFUSED, "the URL is malformed") from None
    schemes = ("https", "http") if policy.allow_http else ("https",)
    if parts.scheme not in schemes:
        raise CoverError(ErrorCode.INPUT_URL_REFUSED, f"{redact(url)}: only {' and '.join(schemes)} URLs are accepted")
    if not parts.hostname or parts.username or parts.password:
        raise CoverError(ErrorCode.INPUT_URL_REFUSED, f"{redact(url)}: a host name and no credentials are required")
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise CoverError(ErrorCode.INPUT_DOWNLOAD_FAILED, f"{redact(url)}: the host name does not resolve") from None
    for info in infos:
        check_address(str(info[4][0]), policy, url)


def _guarded(base: type[HTTPConnection], policy: UrlPolicy, url: str) -> type[HTTPConnection]:
    class Guarded(base):  # type: ignore[valid-type,misc]
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            try:
                check_address(sock.getpeername()[0], policy, url)
            except CoverError:
                sock.close()
                raise
            return sock

    return Guarded


class _GuardedAdapter(HTTPAdapter):
    """Checks the address every connection really reached, before the request is sent."""

    def __init__(self, policy: UrlPolicy, url: str) -> None:
        self.policy, self.url = policy, url
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        http_cls, https_cls = (
            _guarded(HTTPConnection, self.policy, self.url),
            _guarded(HTTPSConnection, self.policy, self.url),
        )
        pools = {
            "http": type("Http", (HTTPConnectionPool,), {"ConnectionCls": http_cls}),
            "https": type("Https", (HTTPSConnectionPool,), {"ConnectionCls": https_cls}),
        }
        self.poolmanager.pool_classes_by_scheme = pools
        self.poolmanager.key_fn_by_scheme = dict(self.poolmanager.key_fn_by_scheme)


def download(
    url: str, dest: Path, policy: UrlPolicy, resume: bool = False, progress: DownloadProgress | None = None
) -> Path:
    """Stream ``url`` to ``dest`` under ``policy``; a partial download never stays behind, unless
    ``resume``.

    Args:
        url: an http(s) URL (checked by the guard, and every redirect again)
        dest: where the file goes; it appears there only once complete
        policy: what the URL may reach, how long and how large the download may be
        resume: keep a partial download (``dest`` + ``.part``) when the transfer breaks off, and
            continue it with an HTTP range request next time (a server that ignores the range sends
            the whole file again, which replaces the part)
        progress: called with (bytes so far, the whole size when the server says it) as blocks arrive
    """
    deadline = time.monotonic() + policy.deadline_s
    tmp = dest.with_suffix(dest.suffix + ".part")
    session = requests.Session()
    session.trust_env = False
    adapter = _GuardedAdapter(policy, url)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    current = url
    keep_part = False
    try:
        for _ in range(policy.max_redirects + 1):
            check_url(current, policy)
            have = tmp.stat().st_size if resume and tmp.is_file() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            timeout = (policy.connect_timeout_s, policy.read_timeout_s)
            with session.get(current, stream=True, allow_redirects=False, timeout=timeout, headers=headers) as response:
                if response.status_code in REDIRECTS and "Location" in response.headers:
                    current = urljoin(current, response.headers["Location"])
                    continue
                if response.status_code >= 400:
                    raise CoverError(
                        ErrorCode.INPUT_DOWNLOAD_FAILED,
                        f"download of {redact(current)} answered HTTP {response.status_code}",
                        retryable=response.status_code >= 500,
                    )
                offset = _resumed_at(response, have, current)
                keep_part = resume
                _stream(response, tmp, policy, deadline, current, offset, progress)
                tmp.replace(dest)
                return dest
        raise CoverError(ErrorCode.INPUT_DOWNLOAD_FAILED, f"{redact(url)}: more than {policy.max_redirects} redirects")
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise CoverError(
            ErrorCode.INPUT_DOWNLOAD_FAILED,
            f"download of {redact(current)} failed: {type(exc).__name__}"
            + ("; run it again to continue where it stopped" if keep_part else ""),
        ) from None
    except CoverError as error:
        keep_part = keep_part and error.code is ErrorCode.INPUT_DOWNLOAD_FAILED  # broken off, not refused
        raise
    finally:
        if not keep_part:
            tmp.unlink(missing_ok=True)
        session.close()


def _resumed_at(response: requests.Response, have: int, url: str) -> int:
    """Where the body starts in the file: ``have`` for a range answer that continues the part, 0 for
    a whole file; a range answer starting elsewhere is refused (the part is dropped)."""
    if response.status_code != HTTPStatus.PARTIAL_CONTENT:
        return 0
    if response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
        return have
    raise CoverError(
        ErrorCode.INPUT_DOWNLOAD_FAILED, f"download of {redact(url)}: the server resumed at the wrong byte"
    )


def _stream(
    response: requests.Response,
    tmp: Path,
    policy: UrlPolicy,
    deadline: float,
    url: str,
    offset: int = 0,
    progress: DownloadProgress | None = None,
) -> None:
    """Copy the body after the first ``offset`` bytes of ``tmp``, a socket read at a time (``read1``),
    so the deadline is checked between reads whatever the sender's pace: a download ends at most one
    read timeout after its deadline."""
    size = offset
    length = response.headers.get("Content-Length", "")
    plain = response.headers.get("Content-Encoding", "identity") == "identity"  # else the length is compressed
    total = offset + int(length) if length.isdigit() and plain else None
    with open(tmp, "ab" if offset else "wb") as out:
        while block := response.raw.read1(1 << 16, decode_content=True):
            size += len(block)
            if size > policy.max_bytes:
                raise CoverError(
                    ErrorCode.INPUT_TOO_LONG, f"download of {redact(url)} exceeds {policy.max_bytes} bytes"
                )
            if time.monotonic() > deadline:
                raise CoverError(
                    ErrorCode.INPUT_DOWNLOAD_FAILED,
                    f"download of {redact(url)} did not finish within {policy.deadline_s:.0f} s",
                )
            out.write(block)
            if progress is not None:
                progress(size, total)
    if total is not None and size < total:
        raise CoverError(
            ErrorCode.INPUT_DOWNLOAD_FAILED,
            f"download of {redact(url)} broke off at {size} of {total} bytes",
        )
