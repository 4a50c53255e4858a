"""Fetching files over HTTP(S), one way for every downloader (pretraining shards, the CORE bundle, hub mirrors).

- `fetch(url, dest, ...)`: GET into an atomic temp file next to `dest` (`common.atomic_open`); the file appears
  under `dest` only once the body is complete (its Content-Length) and the caller's `check(temp_path)` passes.
  Attempts that another try may fix (5xx, 408 / 429, dropped or refused connections, truncated or corrupt
  bodies) are retried with exponential backoff; any other HTTP status fails at once with FileNotFoundError.
- `head_reachable(url)`: one HEAD request, so an `auto` source can decide in seconds before a long download.
- `check_connectable(url)`: a TCP connect to the host (or to the proxy in the environment), for downloads that
  should fail fast with a hint instead of retrying for minutes.
"""

import os
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import requests

from nanochat.common import atomic_open

MAX_BACKOFF_S = 60.0


class RetryableError(Exception):
    """One attempt failed in a way another attempt may fix; `check` functions raise it for a corrupt body."""


def _fetch_once(url: str, dest: str, timeout: float, cancel: threading.Event, check, not_found_hint: str) -> int:
    with atomic_open(dest, "wb") as f:
        try:
            # identity encoding: Content-Length then counts exactly the bytes we write
            with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as r:
                if r.status_code >= 500 or r.status_code in (408, 429):
                    raise RetryableError(f"HTTP {r.status_code} from {url}")
                if r.status_code != 200:
                    raise FileNotFoundError(f"HTTP {r.status_code} for {url}" + (f"; {not_found_hint}"
                                                                                if not_found_hint else ""))
                expected = r.headers.get("Content-Length")
                written = 0
                for chunk in r.iter_content(chunk_size=1 << 20):
                    if cancel.is_set():
                        raise InterruptedError(f"download of {url} cancelled")
                    f.write(chunk)
                    written += len(chunk)
        except requests.RequestException as e:  # refused / dropped connections, timeouts, broken chunked bodies
            raise RetryableError(f"{type(e).__name__}: {e}") from e
        if expected is not None and written != int(expected):
            raise RetryableError(f"truncated: got {written} of {expected} bytes")
        f.flush()
        if check is not None:
            check(f.name)  # the temp file: a corrupt body never appears under dest
    return written


def fetch(url: str, dest: str, *, max_attempts: int = 5, backoff: float = 2.0, timeout: float = 30.0,
          check: Callable[[str], None] | None = None, cancel: threading.Event | None = None, label: str | None = None,
          not_found_hint: str = "", printer=None) -> int:
    """Download url to dest atomically, retrying with backoff; returns the bytes written.

    check(path) inspects the complete temp file and raises RetryableError when its content is unusable.
    cancel: set it to stop at the next chunk or backoff wait (InterruptedError; the temp file is removed).
    Raises FileNotFoundError for a status no retry can fix and ConnectionError once every attempt failed.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    label = label or os.path.basename(dest)
    printer = printer or _print_now
    cancel = cancel or threading.Event()
    for attempt in range(1, max_attempts + 1):
        try:
            return _fetch_once(url, dest, timeout, cancel, check, not_found_hint)
        except RetryableError as e:
            if attempt == max_attempts:
                raise ConnectionError(f"{label}: giving up after {max_attempts} attempts; last error: {e}") from e
            delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S)
            printer(f"{label}: attempt {attempt}/{max_attempts} failed ({e}); retrying in {delay:.2g}s")
            if cancel.wait(delay):
                raise InterruptedError(f"download of {label} cancelled") from e
    raise AssertionError("unreachable: the loop returns or raises")


def _print_now(message: str) -> None:
    print(message, flush=True)


def head_reachable(url: str, timeout: float = 3.0, bad_status: int = 400) -> tuple[bool, str]:
    """(reachable, why) from one HEAD request (redirects followed); a status >= bad_status counts as unreachable."""
    try:
        response = requests.head(url, timeout=timeout, allow_redirects=True)
    except requests.RequestException as e:
        return False, f"{url} unreachable ({type(e).__name__})"
    if response.status_code >= bad_status:
        return False, f"{url} answered HTTP {response.status_code}"
    return True, url


def check_connectable(url: str, timeout: float = 5.0, hint: str = "") -> None:
    """Raise ConnectionError (with `hint`) unless a TCP connection to url's host, or to the proxy the environment
    sets for it, opens within `timeout` seconds."""
    parts = urlsplit(url)
    proxy = requests.utils.get_environ_proxies(url).get(parts.scheme)
    target = urlsplit(proxy) if proxy else parts
    host = target.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach {host}:{port} ({e}) to download {url}" + (f". {hint}" if hint else "")
                              ) from e

