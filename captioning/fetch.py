"""The HTTP client: inference.py fetches images by URL, dataloader.py --download fetches COCO.

Every fetch has a timeout per connect or read, at most MAX_REDIRECTS redirects, http(s)
only, and a size cap, so one bad server cannot hang or exhaust a run. Errors come back as
FetchError with a one-line reason.
"""

import http.client
import urllib.error
import urllib.request

MAX_REDIRECTS = 5
USER_AGENT = "image-captioning/1.0"


class FetchError(Exception):
    """A URL could not be fetched; the message says why in one line. `status` is the HTTP
    status where the server answered with one."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise FetchError(f"redirect to a non-http(s) URL: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def size_limit_message(max_bytes):
    return f"larger than the {max_bytes / 2**20:g} MB limit"


def fetch_url(url, timeout, max_bytes):
    """GET an http(s) URL -> bytes. A body shorter than its Content-Length is an error,
    never a short file. Raises FetchError."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError("only http(s) URLs are supported")
    opener = urllib.request.build_opener(_LimitedRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError(size_limit_message(max_bytes))
            body = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        if e.code in (301, 302, 303, 307, 308):
            raise FetchError(f"more than {MAX_REDIRECTS} redirects") from None
        raise FetchError(f"HTTP {e.code} {e.reason}", status=e.code) from None
    except urllib.error.URLError as e:
        raise FetchError(f"cannot fetch: {e.reason}") from None
    except (TimeoutError, OSError) as e:
        raise FetchError(f"cannot fetch: {str(e) or 'timed out'}") from None
    except http.client.HTTPException as e:  # IncompleteRead: the server hung up early
        raise FetchError(f"incomplete response: {type(e).__name__}") from None
    if len(body) > max_bytes:
        raise FetchError(size_limit_message(max_bytes))
    if length and length.isdigit() and len(body) < int(length):
        raise FetchError(f"incomplete response: {len(body)} of {length} bytes")
    return body
