"""``xmodal web``: a search page and its JSON API, served from the standard library.

Routes (all GET unless said):

    /                      the page (webpage.py): a text box, an image upload, a style menu,
                           a free-form filter, a grid of thumbnails with caption and score
    /app.js, /app.css      its script and style
    /api/search            ?q=TEXT&k=N&style=S&filter=EXPR -> {"query", "k", "filter", "hits": [...]}
    POST /api/search_image multipart/form-data with an `image` file (and k, style, filter fields),
                           or the raw image bytes as the body with k/style/filter in the query string
    /api/styles            {"styles": [...]}: the collection's distinct styles, for the menu
    /image/<id>            the indexed image of row <id>

A hit is ``{"id", "score", "title", "caption", "captions", "concept", "style", "image_url"}`` (`title`:
the first caption, or for an image indexed without captions its file's name); errors are
``{"error": message}`` with 400 (bad query, k or filter), 404, 413 (upload too large) or
503 (Triton or Milvus unreachable).

``/image/<id>`` looks the row up in Milvus by primary key and serves the path stored in that
row (or the file at its URI, for images kept in a shared filesystem): nothing in the URL is ever used as a path, so no URL can reach another file (an id that
is not a plain key, ``../../etc/passwd`` say, is a 404 before Milvus is asked). Nor can a row:
whoever can write to a shared collection chooses its paths, so a row's file is served only when it
lies under one of the roots the collection records (``store.collection_image_roots``: the
directories its indexing runs read images from, and their image store), symlinks followed; any
other is a 404 like a missing file, its path said on the server's stderr, never to the browser.

The server binds to 127.0.0.1 by default and then answers only requests whose Host header
names the loopback (a guard against DNS rebinding). Requests run on a fixed pool of threads,
so each thread's Triton connection is reused (Client keeps one per thread); each response
closes its connection (HTTP/1.0), so idle browser connections never hold a worker.
"""
from __future__ import annotations

import email.message
import http.server
import ipaddress
import json
import mimetypes
import re
import socketserver
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from xmodal import contract, settings, store
from xmodal.client.hits import Hit
from xmodal.client.webpage import APP_CSS, APP_JS, INDEX_HTML
from xmodal.files import ImageRoots, is_uri, read_location

DEFAULT_PORT = 8080
DEFAULT_K = 12
MAX_K = 100
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_QUERY_CHARS = 1000
THREADS = 8
ROW_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# An image is never a document: an SVG opened on its own runs no script.
IMAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"))


def hit_json(hit: Hit) -> dict[str, Any]:
    return {"id": hit.id, "score": round(hit.score, 6), "title": hit.title,
            "caption": hit.captions[0] if hit.captions else "",
            "captions": hit.captions, "concept": hit.concept, "style": hit.style, "image_url": f"/image/{hit.id}",
            **{name: getattr(hit, name) for name in contract.FILE_FIELDS}}


class SearchApp:
    """The routes, independent of the HTTP server: ``handle(method, target, headers, body)``.

    `client` is an open :class:`xmodal.client.Client`; the app searches its image collection
    and serves that collection's images.
    """

    def __init__(self, client, *, default_k: int = DEFAULT_K, max_k: int = MAX_K,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.client = client
        self.collection = client.collection
        self.default_k = default_k
        self.max_k = max_k
        self.max_upload_bytes = max_upload_bytes
        self._styles: list[str] | None = None
        self._styles_lock = threading.Lock()
        self._image_roots: ImageRoots | None = None
        self._image_roots_lock = threading.Lock()

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        try:
            if method in ("GET", "HEAD"):
                if path == "/":
                    return Response(200, INDEX_HTML.encode(), "text/html; charset=utf-8")
                if path == "/app.js":
                    return Response(200, APP_JS.encode(), "text/javascript; charset=utf-8")
                if path == "/app.css":
                    return Response(200, APP_CSS.encode(), "text/css; charset=utf-8")
                if path == "/api/search":
                    return self.search_text(query)
                if path == "/api/styles":
                    return json_response({"collection": self.collection, "styles": self.styles()})
                if path.startswith("/image/"):
                    return self.image(path[len("/image/"):])
            elif method == "POST" and path == "/api/search_image":
                return self.search_image(query, headers, body)
            if path in ("/", "/app.js", "/app.css", "/api/search", "/api/styles", "/api/search_image"):
                raise HTTPError(405, f"method {method} not allowed on {path}")
            raise HTTPError(404, f"no such page: {path}")
        except HTTPError as exc:
            return json_response({"error": exc.message}, exc.status)
        except ValueError as exc:  # bad query, k or filter: the Client's messages are for users
            return json_response({"error": str(exc)}, 400)
        except ConnectionError as exc:
            return json_response({"error": str(exc)}, 503)
        except Exception as exc:  # noqa: BLE001 - log it, tell the browser little
            traceback.print_exc(file=sys.stderr)
            return json_response({"error": f"internal error ({type(exc).__name__})"}, 500)

    # -- API -------------------------------------------------------------------------------------

    def _k(self, value: str | None) -> int:
        if value is None or value.strip() == "":
            return self.default_k
        try:
            k = int(value)
        except ValueError:
            raise ValueError(f"k must be a positive integer, got {value!r}") from None
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if k > self.max_k:
            raise ValueError(f"k must be at most {self.max_k}, got {k}")
        return k

    @staticmethod
    def _filter(style: str | None, expression: str | None) -> str:
        """The style menu's choice and the free-form filter, combined with `and`."""
        chosen = store.equals_filter("style", style) if style else ""
        return store.combine_filters(chosen, expression)

    def search_text(self, query: dict[str, list[str]]) -> Response:
        text = _first(query, "q") or ""
        if not text.strip():
            raise HTTPError(400, "query text is empty: type what the image should show")
        if len(text) > MAX_QUERY_CHARS:
            raise HTTPError(400, f"query text is {len(text)} characters long; at most {MAX_QUERY_CHARS} are allowed")
        k = self._k(_first(query, "k"))
        expression = self._filter(_first(query, "style"), _first(query, "filter"))
        hits = self.client.search_text(text, k=k, filter=expression or None)
        return json_response({"query": text, "k": k, "filter": expression, "hits": [hit_json(h) for h in hits]})

    def search_image(self, query: dict[str, list[str]], headers: dict[str, str], body: bytes) -> Response:
        content_type = headers.get("content-type", "")
        fields = {key: values[0] for key, values in query.items() if values}
        if content_type.lower().startswith("multipart/form-data"):
            parts = parse_multipart(content_type, body)
            image = parts.pop("image", None)
            fields.update({name: data.decode("utf-8", "replace") for name, (_, data) in parts.items()})
            data = image[1] if image else b""
        else:
            data = body
        if not data:
            raise HTTPError(400, "no image: send a multipart form with an `image` file, or the image bytes as the body")
        k = self._k(fields.get("k"))
        expression = self._filter(fields.get("style"), fields.get("filter"))
        hits = self.client.search_image(data, k=k, filter=expression or None)
        return json_response({"k": k, "filter": expression, "hits": [hit_json(h) for h in hits]})

    def styles(self) -> list[str]:
        """The collection's distinct styles, read once (the index is filled by a batch job)."""
        with self._styles_lock:
            if self._styles is None:
                self._styles = self.client.searcher.distinct(self.collection, "style")
            return self._styles

    def image_roots(self, *, again: bool = False) -> ImageRoots:
        """The roots the collection records, read once (`again`: read anew, for a root an
        indexing run recorded since)."""
        with self._image_roots_lock:
            if self._image_roots is None or again:
                self._image_roots = ImageRoots(self.client.searcher.image_roots(self.collection))
                if not self._image_roots:
                    print(f"xmodal web: collection {self.collection!r} records no image roots (it was indexed "
                          "before xmodal recorded them): its images are not served until `xmodal index` runs "
                          "on its input again", file=sys.stderr, flush=True)
            return self._image_roots

    def image_place(self, row_id: str, location: str) -> Path | str | None:
        """Where to read a row's image: its path resolved, or its URI, when it lies under a root
        of the collection; else None."""
        if not location or not (is_uri(location) or Path(location).is_absolute()):
            return None  # a relative path would be read from wherever the server runs
        place = self.image_roots().place(location)
        if place is None:
            place = self.image_roots(again=True).place(location)
        if place is None:
            print(f"xmodal web: row {row_id} names {location!r}, outside the roots collection "
                  f"{self.collection!r} records: not served", file=sys.stderr, flush=True)
        return place

    def image(self, raw_id: str) -> Response:
        row_id = unquote(raw_id)
        if not ROW_ID.fullmatch(row_id):  # "../../etc/passwd", "a/b", "": no such row, by construction
            raise HTTPError(404, "no such image")
        row = self.client.searcher.get(self.collection, row_id, fields=["id", "image"])
        location = str(row.get("image") or "") if row else ""
        place = self.image_place(row_id, location)
        if place is None or (isinstance(place, Path) and not place.is_file()):  # a FIFO would hang the read
            raise HTTPError(404, "no such image")
        try:  # a path as resolved by the check, or a URI (xmodal index --image-store: a shared filesystem)
            data = read_location(place)
        except (OSError, ValueError):
            raise HTTPError(404, "no such image") from None
        content_type = mimetypes.guess_type(location.rsplit("/", 1)[-1])[0] or "application/octet-stream"
        return Response(200, data, content_type,
                        {"Cache-Control": "private, max-age=300", "Content-Security-Policy": IMAGE_CSP})


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``multipart/form-data`` -> {field name: (filename or None, bytes)}; the body is split on
    its boundary, so the bytes come back exactly as sent."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise HTTPError(400, "multipart/form-data without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    sections = body.split(delimiter)
    if len(sections) < 3:
        raise HTTPError(400, "malformed multipart/form-data body")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for section in sections[1:]:
        if section.startswith(b"--"):  # the closing delimiter
            break
        if section.startswith(b"\r\n"):
            section = section[2:]
        head, separator, data = section.partition(b"\r\n\r\n")
        if not separator:
            raise HTTPError(400, "malformed multipart/form-data part")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        part = email.message.Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                part[name.strip()] = value.strip()
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name:
            filename = part.get_param("filename", header="content-disposition")
            fields[name] = (filename if isinstance(filename, str) else None, data)
    return fields


# -- the HTTP server -------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    server: "SearchServer"
    server_version = "xmodal-web"
    protocol_version = "HTTP/1.0"  # one request a connection: idle browser connections hold no worker
    timeout = 30  # seconds a slow client may take to send its request

    def do_GET(self) -> None:
        self._respond("GET")

    def do_HEAD(self) -> None:
        self._respond("HEAD")

    def do_POST(self) -> None:
        self._respond("POST")

    def _respond(self, method: str) -> None:
        response = self._guard() or self._dispatch(method)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if response.content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", PAGE_CSP)
        if "Cache-Control" not in response.headers:
            self.send_header("Cache-Control", "no-store")
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    def _guard(self) -> Response | None:
        if not self.server.loopback_only:
            return None
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        if name == "localhost" or _is_loopback(name):
            return None
        return json_response({"error": f"unexpected Host header {host!r}: this server answers only on the loopback"}, 403)

    def _dispatch(self, method: str) -> Response:
        body = b""
        if method == "POST":
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return json_response({"error": "bad Content-Length"}, 400)
            if length > self.server.app.max_upload_bytes:
                self.close_connection = True
                return json_response({"error": f"upload too large: {length} bytes, at most "
                                               f"{self.server.app.max_upload_bytes} are accepted"}, 413)
            body = self.rfile.read(length) if length > 0 else b""
        headers = {key.lower(): value for key, value in self.headers.items()}
        return self.server.app.handle(method, self.path, headers, body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")


def _is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class SearchServer(http.server.HTTPServer):
    """An HTTP server that answers on a fixed pool of `threads` threads."""

    daemon_threads = True

    def __init__(self, app: SearchApp, host: str = settings.HOST, port: int = DEFAULT_PORT, *,
                 threads: int = THREADS, log: Callable[[str], Any] | None = None) -> None:
        self.app = app
        self.log = log
        self.loopback_only = host == "localhost" or _is_loopback(host)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="xmodal-web")
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host's name up (socket.getfqdn): not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        self._pool.submit(self._process, request, client_address)

    def _process(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a broken connection must not kill the worker
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_server(client, host: str = settings.HOST, port: int = DEFAULT_PORT, *, threads: int = THREADS,
                log: Callable[[str], Any] | None = None, **app_kwargs: Any) -> SearchServer:
    """A server for `client` (an open Client); port 0 picks a free one (see ``server.url``)."""
    return SearchServer(SearchApp(client, **app_kwargs), host, port, threads=threads, log=log)


def serve(triton_url: str | None = None, milvus_uri: str | None = None, collection: str = settings.IMAGE_COLLECTION,
          *, host: str = settings.HOST, port: int = DEFAULT_PORT, threads: int = THREADS) -> int:
    """Run the search page until Ctrl-C (the `xmodal web` command)."""
    from xmodal.client.sdk import Client

    with Client(triton_url, milvus_uri, collection) as client:
        server = make_server(client, host, port, threads=threads, log=lambda line: print(line, file=sys.stderr))
        print(f"xmodal web: {server.url} (collection {collection!r}, model {client.card.name}); Ctrl-C stops",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0
