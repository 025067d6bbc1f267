"""`xmodal web` against the session's tiny tritonserver (tiny ONNX encoders) and milvus-lite: the
JSON API over HTTP, and the page in real headless Chromium.

The browser test needs Debian's `chromium` and Playwright's Python package (which drives that
Chromium; no browser is downloaded). Without either it is skipped, saying which is missing.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from playwright.sync_api import sync_playwright

import tinymodel
from xmodal import contract, store
from xmodal.client import Client
from xmodal.client.web import parse_multipart
from xmodal.indexer import IndexJob

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

# A caption that is markup: the page must show it as text and run none of it.
XSS_CAPTION = '<script>document.title="pwned"</script><img src=x onerror="window.xssed=1"><b>bold</b> cat'
CHROMIUM = os.environ.get("XMODAL_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT_COPY = Path("/tmp/xmodal-web-screenshot.png")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_triton, ray_local):
    directory = tmp_path_factory.mktemp("web")
    tinymodel.write_png(directory / "images" / "other" / "cyan.png", (20, 200, 210), "rectangle")
    extra = [{"id": "other/cyan", "concept": "cyan", "style": "other", "split": "test",
              "image": "images/other/cyan.png", "captions": [XSS_CAPTION, "a cyan star"]}]
    manifest, images = tinymodel.write_corpus(directory, extra=extra)
    images.append(directory / "images" / "other" / "cyan.png")
    db = directory / "milvus" / "xmodal.db"
    triton = tiny_triton
    report = IndexJob(manifest=manifest, triton_url=triton.url, milvus_uri=str(db), batch_size=4, progress=False).run()
    assert report.rows_written == len(images)
    with Client(triton.url, db) as client, tinymodel.web_page(client) as server:
        yield {"client": client, "server": server, "url": server.url, "images": images,
               "port": server.server_address[1]}
    store.release_local(db)


def request(stack, path: str, *, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """The raw request, path sent exactly as given (urllib would not normalise it either, but
    http.client makes that certain)."""
    connection = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def get_json(stack, path: str, **kwargs) -> tuple[int, dict]:
    status, headers, body = request(stack, path, **kwargs)
    assert headers["content-type"].startswith("application/json"), headers
    return status, json.loads(body)


def search(stack, **params) -> tuple[int, dict]:
    return get_json(stack, "/api/search?" + urlencode(params))


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


# -- the API -----------------------------------------------------------------------------------

def test_page_and_assets(stack):
    status, headers, body = request(stack, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert b'<script src="/app.js"></script>' in body and b'id="results"' in body
    for path, kind in [("/app.js", "text/javascript"), ("/app.css", "text/css")]:
        status, headers, _ = request(stack, path)
        assert status == 200 and headers["content-type"].startswith(kind)


def test_search_returns_the_clients_hits(stack):
    status, data = search(stack, q="a red face", k=3)
    assert status == 200 and data["query"] == "a red face" and data["k"] == 3 and data["filter"] == ""
    expected = stack["client"].search_text("a red face", k=3)
    assert [h["id"] for h in data["hits"]] == [h.id for h in expected]
    assert [h["score"] for h in data["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    first = data["hits"][0]
    assert set(first) == {"id", "score", "title", "caption", "captions", "concept", "style", "image_url",
                          *contract.FILE_FIELDS}
    assert first["image_url"] == f"/image/{first['id']}" and first["caption"] == first["captions"][0]
    assert first["title"] == first["caption"]  # an image indexed without captions: its file's name
    assert "/" not in first["id"]  # no server path travels to the browser
    status, data = search(stack, q="red")
    assert status == 200 and len(data["hits"]) == 7  # the default k (12) finds every image


def test_thumbnails_are_the_indexed_files(stack):
    _, data = search(stack, q="green star", k=7)
    by_id = {hit.id: hit.image for hit in stack["client"].search_text("green star", k=7)}
    for hit in data["hits"]:
        status, headers, body = request(stack, hit["image_url"])
        assert status == 200 and headers["content-type"] == "image/png"
        assert body == Path(by_id[hit["id"]]).read_bytes()
        assert "sandbox" in headers["content-security-policy"]


@pytest.mark.parametrize("path", [
    "/image/../../etc/passwd", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2e%2e/%2e%2e/etc/passwd",
    "/image/etc/passwd", "/image//etc/passwd", "/image/", "/image/%00", "/image/" + "0" * 32,
    "/image/" + "a" * 65, "/image/..\\..\\etc\\passwd",
])
def test_traversal_and_unknown_ids_are_404(stack, path):
    status, data = get_json(stack, path)
    assert status == 404 and data == {"error": "no such image"}


def test_style_menu_and_filters(stack):
    status, data = get_json(stack, "/api/styles")
    assert status == 200 and data["styles"] == ["other", "tiny"]
    _, data = search(stack, q="cat", k=10, style="other")
    assert [h["style"] for h in data["hits"]] == ["other"] and data["filter"] == 'style == "other"'
    _, data = search(stack, q="cat", k=10, style="tiny", filter='concept in ["red", "blue"]')
    assert sorted(h["concept"] for h in data["hits"]) == ["blue", "red"]
    assert data["filter"] == '(style == "tiny") and (concept in ["red", "blue"])'
    _, data = search(stack, q="cat", k=10, style='tiny" or style != "')  # quoted, so it matches nothing
    assert data["hits"] == []


@pytest.mark.parametrize("expression", ['style = = "tiny"', 'colour == "red"', "concept in ["])
def test_bad_filter_is_400_with_the_reason(stack, expression):
    status, data = search(stack, q="red", filter=expression)
    assert status == 400
    assert data["error"].startswith(f"invalid filter {expression!r}: ") and len(data["error"]) > len(expression) + 20
    assert "Traceback" not in data["error"]


@pytest.mark.parametrize("params", [{"q": ""}, {"q": "   "}, {}, {"k": "3"}])
def test_empty_query_is_400(stack, params):
    status, data = search(stack, **params)
    assert status == 400 and data["error"].startswith("query text is empty")


@pytest.mark.parametrize("k, message", [("0", "positive integer"), ("-2", "positive integer"),
                                        ("three", "positive integer, got 'three'"), ("101", "at most 100")])
def test_bad_k_is_400(stack, k, message):
    status, data = search(stack, q="red", k=k)
    assert status == 400 and message in data["error"]


def test_search_by_image_upload(stack):
    path = stack["images"][3]
    expected = stack["client"].search_image(path, k=4)
    body, content_type = multipart({"k": "4"}, {"image": ("yellow.png", path.read_bytes())})
    status, data = get_json(stack, "/api/search_image", method="POST", body=body,
                            headers={"Content-Type": content_type})
    assert status == 200 and [h["id"] for h in data["hits"]] == [h.id for h in expected]
    assert data["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # The raw bytes as the body, options in the query string; with a filter.
    status, data = get_json(stack, "/api/search_image?k=3&filter=" + quote('concept != "yellow"'), method="POST",
                            body=path.read_bytes(), headers={"Content-Type": "image/png"})
    assert status == 200 and len(data["hits"]) == 3 and "yellow" not in {h["concept"] for h in data["hits"]}


def test_bad_uploads_are_400_or_413(stack):
    body, content_type = multipart({"k": "2"}, {"image": ("x.png", b"this is not an image")})
    status, data = get_json(stack, "/api/search_image", method="POST", body=body,
                            headers={"Content-Type": content_type})
    assert status == 400 and "Triton rejected image" in data["error"]
    body, content_type = multipart({"k": "2"}, {})
    status, data = get_json(stack, "/api/search_image", method="POST", body=body,
                            headers={"Content-Type": content_type})
    assert status == 400 and data["error"].startswith("no image")
    status, data = get_json(stack, "/api/search_image", method="POST", body=b"x" * 64,
                            headers={"Content-Length": str(11 * 1024 * 1024)})
    assert status == 413 and "upload too large" in data["error"]


def test_parse_multipart_keeps_bytes_exact():
    payload = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n\r\n"
    body, content_type = multipart({"k": "5", "filter": 'style == "a"'}, {"image": ("a.bin", payload)})
    fields = parse_multipart(content_type, body)
    assert fields["image"] == ("a.bin", payload)
    assert fields["k"] == (None, b"5") and fields["filter"] == (None, b'style == "a"')


def test_other_hosts_methods_and_paths(stack):
    status, data = get_json(stack, "/api/search?q=red", headers={"Host": "attacker.example:8080"})
    assert status == 403 and "Host" in data["error"]
    assert get_json(stack, "/api/search?q=red", headers={"Host": "localhost:1"})[0] == 200
    assert get_json(stack, "/api/search?q=red", method="POST", body=b"")[0] == 405
    assert get_json(stack, "/nothing/here")[0] == 404


def test_the_json_carries_markup_as_data(stack):
    _, data = search(stack, q="cat", k=10, style="other")
    assert data["hits"][0]["caption"] == XSS_CAPTION


# -- the page in headless Chromium ---------------------------------------------------------------

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def test_page_in_headless_chromium(stack, tmp_path):
    assert Path(CHROMIUM).exists(), (
        f"no Chromium at {CHROMIUM}: `make test` installs Debian's `chromium` package (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(stack["url"] + "/")
            page.wait_for_function("() => document.querySelectorAll('#style option').length === 3")
            assert page.locator("#style option").all_inner_texts() == ["all styles", "other", "tiny"]

            # Type a query like a person, submit, wait for the grid.
            page.locator("#k").fill("12")
            page.locator("#q").click()
            page.keyboard.type("a smiling cat face")
            page.locator("#search").click()
            page.wait_for_selector("#results[data-state='done'] .hit")
            cells = page.locator("#results .hit")
            assert cells.count() == 7
            captions = page.locator("#results .hit .caption").all_inner_texts()
            expected = stack["client"].search_text("a smiling cat face", k=12)
            assert captions == [hit.captions[0] for hit in expected]
            scores = page.locator("#results .hit .score").all_inner_texts()
            assert scores[0] == f"score {expected[0].score:.3f}"
            # Every thumbnail loaded from /image/<id>.
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            sources = page.eval_on_selector_all("#results img", "images => images.map(i => i.getAttribute('src'))")
            assert sources == [f"/image/{hit.id}" for hit in expected]

            # The markup caption is shown as text and ran nothing.
            assert XSS_CAPTION in captions
            assert page.title() == "xmodal search"
            assert page.evaluate("() => window.xssed === undefined")
            assert page.locator("#results script, #results b, #results .caption img").count() == 0
            assert not errors, errors

            screenshot = tmp_path / "xmodal-web.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            shutil.copyfile(screenshot, SCREENSHOT_COPY)

            # The style menu narrows the grid; a bad filter shows the server's message.
            page.locator("#style").select_option("other")
            page.locator("#search").click()
            page.wait_for_function(
                "() => document.querySelector('#results').dataset.state === 'done' && "
                "document.querySelectorAll('#results .hit').length === 1")
            page.locator("#style").select_option("")
            page.locator("#filter").fill("style = = 1")
            page.locator("#search").click()
            page.wait_for_selector("#error:not([hidden])")
            assert page.locator("#error").inner_text().startswith("invalid filter 'style = = 1': ")
            assert page.locator("#results .hit").count() == 0

            # Upload an image: the multipart POST finds that image first.
            page.locator("#filter").fill("")
            page.locator("#k").fill("3")
            page.locator("#image").set_input_files(str(stack["images"][3]))
            page.locator("#search-image").click()
            page.wait_for_selector("#results[data-state='done'] .hit")
            assert page.locator("#error").is_hidden()
            assert page.locator("#results .hit .caption").all_inner_texts() == [
                hit.captions[0] for hit in stack["client"].search_image(stack["images"][3], k=3)]
            assert page.locator("#results .hit .caption").first.inner_text() == "yellow rectangle"
        finally:
            browser.close()
