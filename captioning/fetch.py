"""The HTTP client: inference.py fetches images by URL, dataloader.py --download fetches COCO.

One `Client` (a pooled requests.Session) per run, so a 20,000-image download reuses a few
kept-alive connections instead of making 20,000 handshakes. Every request has a timeout per
connect or read, at most MAX_REDIRECTS redirects, http(s) only, and a size cap, so one bad
server cannot hang or exhaust a run. A body shorter than its Content-Length is an error,
never a short file. Errors come back as FetchError with a one-line reason.

Large files (COCO's 241 MB annotations archive) stream to disk under `<path>.part`, and a
partial file is resumed with an HTTP Range request where the server honours one (If-Range
with the validator saved when the download started, so a changed file restarts instead of
being appended to). The timeout is per connect and per read, as in requests: a server that
drips a byte within every --timeout is not cut off.
"""

import os

import requests
from requests.adapters import HTTPAdapter

import re

MAX_REDIRECTS = 5
DEFAULT_MAX_DOWNLOAD_MB = 20.0  # an image by URL (inference.py --max_download_mb)
USER_AGENT = "image-captioning/1.0"
CHUNK = 1 << 20


class FetchError(Exception):
    """A URL could not be fetched; the message says why in one line. `status` is the HTTP
    status where the server answered with one."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def size_limit_message(max_bytes):
    return f"larger than the {max_bytes / 2**20:g} MB limit"


def is_url(source):
    """scheme://... (http, https, or one the Client will refuse by name)."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source) is not None


def looks_like_html(data):
    """An error or login page served with status 200 where an image was expected."""
    return data.lstrip()[:15].lower().startswith((b"<!doctype", b"<html"))


class Client:
    """A requests.Session whose pool keeps up to `pool_size` connections per host alive
    (size it to the number of threads that share it)."""

    def __init__(self, pool_size=8, timeout=10.0):
        self.timeout = timeout
        self.session = requests.Session()
        self.session.max_redirects = MAX_REDIRECTS
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0,
                              pool_block=True)
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, adapter)

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _get(self, url, headers=None):
        if not url.lower().startswith(("http://", "https://")):
            raise FetchError("only http(s) URLs are supported")
        try:
            response = self.session.get(url, stream=True, timeout=self.timeout,
                                        headers=headers or {})
        except requests.TooManyRedirects:
            raise FetchError(f"more than {MAX_REDIRECTS} redirects") from None
        except requests.exceptions.InvalidSchema as e:
            raise FetchError(f"redirect to a non-http(s) URL: {e}") from None
        except requests.Timeout:
            raise FetchError("cannot fetch: timed out") from None
        except requests.RequestException as e:
            raise FetchError(f"cannot fetch: {_reason(e)}") from None
        if response.status_code >= 400:
            response.close()
            raise FetchError(f"HTTP {response.status_code} {response.reason}",
                             status=response.status_code)
        return response

    def get_bytes(self, url, max_bytes):
        """GET url -> its body, at most max_bytes."""
        with self._get(url) as response:
            length = _content_length(response)
            if length is not None and length > max_bytes:
                raise FetchError(size_limit_message(max_bytes))
            body = bytearray()
            for chunk in _chunks(response):
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(size_limit_message(max_bytes))
        return bytes(body)

    def download(self, url, path, max_bytes, progress=None):
        """Stream url to path through `<path>.part`, resuming a partial .part with a Range
        request (restarting where the server ignores it, answers 416, or the file changed).
        `progress(done, total)` is called as bytes arrive. Raises FetchError; the .part stays
        for the next try."""
        part, meta = f"{path}.part", f"{path}.part.validator"
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        validator = open(meta).read().strip() if have and os.path.isfile(meta) else ""
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be the file's own
        if have:
            headers["Range"] = f"bytes={have}-"
            if validator:
                headers["If-Range"] = validator
        try:
            response = self._get(url, headers)
        except FetchError as e:
            if e.status != 416 or not have:
                raise
            os.remove(part)  # nothing left to send from there: the .part is not this file
            return self.download(url, path, max_bytes, progress)
        with response:
            if response.status_code != 206 or not response.headers.get(
                    "Content-Range", "").startswith(f"bytes {have}-"):
                have = 0  # the whole file came back: start again
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if not have:
                with open(meta, "w") as f:
                    f.write(response.headers.get("ETag") or
                            response.headers.get("Last-Modified") or "")
            length = _content_length(response)
            total = have + length if length is not None else None
            if total is not None and total > max_bytes:
                raise FetchError(size_limit_message(max_bytes))
            with open(part, "ab" if have else "wb") as f:
                done = have
                if progress:
                    progress(done, total)
                for chunk in _chunks(response):
                    f.write(chunk)
                    done += len(chunk)
                    if done > max_bytes:
                        raise FetchError(size_limit_message(max_bytes))
                    if progress:
                        progress(done, total)
        os.replace(part, path)
        os.remove(meta)


def _chunks(response):
    """The body in chunks; a connection that ends before Content-Length is an error (urllib3
    enforces the length)."""
    try:
        yield from response.iter_content(CHUNK)
    except requests.exceptions.ChunkedEncodingError as e:
        raise FetchError(f"incomplete response: {_reason(e)}") from None
    except requests.exceptions.ConnectionError as e:
        raise FetchError(f"incomplete response: {_reason(e)}") from None
    except requests.Timeout:
        raise FetchError("cannot fetch: timed out") from None


def _content_length(response):
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def _reason(error):
    """The innermost readable reason of a requests/urllib3 error, on one line."""
    while error.args and isinstance(error.args[0], Exception):
        error = error.args[0]
    text = str(error) or type(error).__name__
    if "IncompleteRead" in text or "bytes read" in text:
        return "the server closed the connection early"
    return text.splitlines()[0][:200]
