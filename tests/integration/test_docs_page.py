"""The /docs page in a real browser: Chromium (the system's, Debian's `chromium` package) driven
by Playwright against a real `floe serve` (fake engine, an embedder and a cross-encoder).

The page renders the OpenAPI 3.1 document with every operation and schema, fetches nothing but
the server itself (no CDN), "Try it out" round-trips embeddings, rerank and tokenize requests
with the document's example bodies, an error answer shows the envelope, and with --api-key the
Authorize button takes the key, loads the description and every request from the page carries it.

A failing test saves a screenshot under its tmp_path and names it in the failure. Without
Playwright or a Chromium executable the tests skip and say which is missing; .ci/run installs
Chromium (apt-get, as root). FLOE_TEST_CHROMIUM names another Chromium or Chrome executable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator, Optional

import pytest

from floe.frontend import openapi
from tests.support import floe_serve

pytestmark = pytest.mark.slow

KEY = "s3cret-docs"
# Headless Chromium with nothing of its own going to the network (no updates, sync, QUIC probes);
# --no-sandbox because CI runs as root. Playwright adds --headless and a fresh profile.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_executable() -> Optional[str]:
    named = os.environ.get("FLOE_TEST_CHROMIUM")
    if named:
        return named
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                None)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser test: the playwright package is missing (the `test` extra has it: "
                    "bash scripts/install.sh)")
    exe = chromium_executable()
    if exe is None:
        pytest.skip("no browser test: no Chromium executable (install Debian's `chromium`: "
                    "apt-get install chromium, which .ci/run does as root; or set "
                    "FLOE_TEST_CHROMIUM=/path/to/chromium)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        except Exception as e:   # a Chromium that is there must work: fail, saying which one
            raise RuntimeError(f"{exe} did not start ({e}); FLOE_TEST_CHROMIUM names another "
                               "Chromium or Chrome") from e
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory, bert_reranker):   # browser first: skip before building
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    "--model", bert_reranker,
                    tmp_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


@pytest.fixture(scope="module")
def key_server(browser, tmp_path_factory):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--api-key", KEY,
                    tmp_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


class Page:
    """One browser tab on a server's /docs, with what it requested and what its console said."""

    def __init__(self, browser, base_url: str) -> None:
        self.base_url = base_url
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.page = self.context.new_page()
        self.requests: list[tuple[str, str, Optional[str]]] = []   # (method, url, authorization)
        self.console_errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(
            (r.method, r.url, r.headers.get("authorization"))))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))

    def operation(self, method: str, path: str):
        return self.page.locator(f".opblock-{method}").filter(
            has=self.page.locator(f".opblock-summary-path[data-path='{path}']"))

    def listed_operations(self) -> set[tuple[str, str]]:
        rows = self.page.locator(".opblock").evaluate_all(
            "es => es.map(e => [e.querySelector('.opblock-summary-method').textContent,"
            " e.querySelector('.opblock-summary-path').dataset.path])")
        return {(m.lower(), p) for m, p in rows}

    def try_it_out(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, str]:
        """Expands the operation, presses "Try it out", optionally replaces the example body,
        presses Execute and returns the status and body the page shows."""
        op = self.operation(method, path)
        assert op.count() == 1, f"{method.upper()} {path} is not listed once on the page"
        op.locator(".opblock-summary").click()
        op.locator(".try-out__btn").click()
        if body is not None:
            op.locator("textarea.body-param__text").fill(json.dumps(body))
        op.locator("button.execute").click()
        row = op.locator(".live-responses-table tbody tr.response").first
        row.locator(".response-col_status").wait_for(timeout=30_000)
        status = int(row.locator(".response-col_status").inner_text().strip())
        shown = row.locator(".response-col_description .highlight-code pre").first.inner_text()
        return status, shown

    def off_server_requests(self) -> list[str]:
        return [u for _, u, _ in self.requests
                if not u.startswith(self.base_url + "/") and not u.startswith("data:")]

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def docs_page(browser, base_url: str, tmp_path, name: str) -> Iterator[Page]:
    """Opens /docs; on any failure, saves a full-page screenshot and names it in the failure."""
    tab = Page(browser, base_url)
    try:
        tab.page.goto(base_url + "/docs")
        yield tab
    except Exception as e:
        shot = tmp_path / f"{name}.png"
        try:
            tab.page.screenshot(path=str(shot), full_page=True)
            where = f"screenshot of the page: {shot}"
        except Exception as s:   # the failure is what matters; say why there is no picture
            where = f"no screenshot ({s})"
        raise AssertionError(f"{e}\n{where}\nconsole errors: {tab.console_errors}") from e
    finally:
        tab.close()


def test_docs_page_shows_every_operation_and_schema_offline(browser, server, tmp_path):
    doc = openapi.openapi_document()
    with docs_page(browser, server.url, tmp_path, "docs") as tab:
        tab.page.wait_for_selector(".opblock", timeout=30_000)
        assert tab.page.locator(".info .title").inner_text().startswith("floe")
        assert "OAS 3.1" in tab.page.locator(".info .title .version-stamp").inner_text()
        want = {(method, path) for path, ops in doc["paths"].items() for method in ops}
        assert tab.listed_operations() == want
        for path in ("/rerank", "/v1/rerank", "/embed_sparse", "/tokenize", "/v1/embeddings"):
            assert tab.operation("post", path).is_visible(), path
        # grouped by the document's tags, none left in Swagger UI's "default" group
        tags = tab.page.locator(".opblock-tag-section .opblock-tag").evaluate_all(
            "es => es.map(e => e.dataset.tag)")
        assert tags == [t["name"] for t in doc["tags"]]
        schemas = tab.page.locator("section.models").inner_text()
        for name in doc["components"]["schemas"]:
            assert name in schemas, f"schema {name} is not shown"
        assert tab.off_server_requests() == []     # no CDN, no validator badge, nothing outside
        assert tab.console_errors == []


def test_try_it_out_embeddings_rerank_and_tokenize(browser, server, tmp_path):
    with docs_page(browser, server.url, tmp_path, "try-it-out") as tab:
        tab.page.wait_for_selector(".opblock", timeout=30_000)
        # the example bodies of the document, as a person pressing Execute sends them
        status, shown = tab.try_it_out("post", "/v1/embeddings")
        assert status == 200, shown
        data = json.loads(shown)["data"]
        assert len(data) == 3 and len(data[0]["embedding"]) == 384
        status, shown = tab.try_it_out("post", "/rerank")
        assert status == 200, shown
        rows = json.loads(shown)
        assert sorted(r["index"] for r in rows) == [0, 1] and all("text" in r for r in rows)
        status, shown = tab.try_it_out("post", "/tokenize")
        assert status == 200, shown
        assert "fox" in [t["text"] for t in json.loads(shown)[0]]
        posted = [u for m, u, _ in tab.requests if m == "POST"]
        assert posted == [server.url + p for p in ("/v1/embeddings", "/rerank", "/tokenize")]


def test_an_error_answer_shows_the_envelope(browser, server, tmp_path):
    with docs_page(browser, server.url, tmp_path, "error") as tab:
        tab.page.wait_for_selector(".opblock", timeout=30_000)
        status, shown = tab.try_it_out("post", "/embed", {"inputs": []})
        assert status == 400
        err = json.loads(shown)["error"]
        assert err["param"] == "inputs" and err["code"] == "validation" and err["message"]
        assert set(err) == {"message", "type", "param", "code"}


def test_with_an_api_key_authorize_loads_the_description_and_requests_carry_it(
        browser, key_server, tmp_path):
    with docs_page(browser, key_server.url, tmp_path, "api-key") as tab:
        authorize = tab.page.locator(".auth-wrapper button.authorize")
        authorize.wait_for(timeout=30_000)
        # the description is behind the key: the page says so and lists nothing yet
        assert "needs an API key" in tab.page.locator(".info").inner_text()
        assert tab.page.locator(".opblock").count() == 0
        authorize.click()
        modal = tab.page.locator(".dialog-ux .modal-ux")
        # a wrong key: refused, said so, and the dialog asks again
        modal.locator("input#auth-bearer-value").fill("wrong")
        modal.locator("button.authorize").click()
        tab.page.wait_for_function(
            "document.querySelector('.info').innerText.includes('key was refused')")
        assert tab.page.locator(".opblock").count() == 0
        modal.locator("input#auth-bearer-value").fill(KEY)
        modal.locator("button.authorize").click()
        modal.locator("button.btn-done").click()
        tab.page.wait_for_selector(".opblock", timeout=30_000)
        assert ("post", "/v1/embeddings") in tab.listed_operations()
        status, shown = tab.try_it_out("post", "/v1/embeddings")
        assert status == 200, shown
        assert len(json.loads(shown)["data"]) == 3
        # the description: without a key and with the wrong one (401, the placeholder), then
        # with the key
        assert [a for _, u, a in tab.requests if u == key_server.url + "/openapi.json"] == [
            None, "Bearer wrong", f"Bearer {KEY}"], tab.requests
        assert [(u, a) for m, u, a in tab.requests if m == "POST"] == [
            (key_server.url + "/v1/embeddings", f"Bearer {KEY}")], tab.requests
        assert tab.off_server_requests() == []
