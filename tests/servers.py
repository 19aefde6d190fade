"""Stand-ins on 127.0.0.1 for the hosts the code talks to, for conftest.py's fixtures:
RoutesHandler (any URL's status, body, headers, delays and truncations), RealHostServer (a
file host shaped like images.cocodataset.org: keep-alive, ETag, Range requests) and FakeHub
(the Hub's repo-creation endpoint). Nothing here reaches the network."""

import http.server
import json
import threading
import time


class RoutesHandler(http.server.BaseHTTPRequestHandler):
    routes = {}
    log = []

    def do_GET(self):  # noqa: N802
        self.log.append(self.path)
        route = self.routes.get(self.path, (404, b"not found", "text/plain"))
        status, body, ctype = route[:3]
        options = route[3] if len(route) > 3 else {}
        time.sleep(options.get("delay", 0))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for key, value in options.get("headers", {}).items():
            self.send_header(key, value)
        if not options.get("no_length"):
            self.send_header("Content-Length", str(options.get("length", len(body))))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


class RealHostHandler(http.server.BaseHTTPRequestHandler):
    """Serves files like images.cocodataset.org: HTTP/1.1 keep-alive, an ETag, Range
    requests answered with 206 (416 past the end; the whole file when If-Range no longer
    matches), 404 for anything else. `server.cut` maps a path to a byte count after
    which the first response for it hangs up (an interrupted download)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        srv = self.server
        path = self.path.split("?")[0]
        srv.requests.append((path, self.headers.get("Range")))
        body = srv.files.get(path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not found")
            return
        start = 0
        ranged = self.headers.get("Range")
        etag = f'"{len(body)}-{hash(body[:4096]) & 0xffffffff:x}"'
        if_range = self.headers.get("If-Range")
        if (ranged and srv.ranges and ranged.startswith("bytes=") and ranged.endswith("-")
                and (if_range is None or if_range == etag)):
            start = int(ranged[6:-1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cut = srv.cut.pop(path, None)
        end = len(body) if cut is None else min(len(body), start + cut)
        view = memoryview(body)
        try:
            for i in range(start, end, 1 << 20):
                self.wfile.write(view[i:min(end, i + (1 << 20))])
                srv.bytes_sent[path] = srv.bytes_sent.get(path, 0) + min(end, i + (1 << 20)) - i
        except (BrokenPipeError, ConnectionResetError):
            return
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


class RealHostServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files, ranges=True):
        super().__init__(("127.0.0.1", 0), RealHostHandler)
        self.files, self.ranges = files, ranges
        self.cut, self.requests, self.bytes_sent, self.connections = {}, [], {}, 0

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # a client that hung up mid-body (the tests do that on purpose)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub's repo-creation endpoint on 127.0.0.1 (POST /api/repos/create answers as the
    Hub does); `created` holds the JSON bodies it was sent."""

    def __init__(self):
        self.created = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler):
                body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
                if handler.path != "/api/repos/create":
                    handler.send_error(404)
                    return
                self.created.append(body)
                answer = json.dumps({"url": f"{self.url}/{body['organization']}/"
                                            f"{body['name']}"}).encode()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(answer)))
                handler.end_headers()
                handler.wfile.write(answer)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()
