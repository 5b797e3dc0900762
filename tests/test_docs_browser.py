"""The built HTML documentation, opened in a real headless browser with the
network switched off: the math is typeset by the MathJax copy shipped with
the build, and no link on the page points at a missing file or anchor.

The test builds the docs with Sphinx, loads a few pages from ``file://``
URLs in Chromium (host names resolve to nothing and all traffic goes to a
dead proxy, so a page that needs the network cannot render), lets the
page's JavaScript run and checks the DOM Chromium hands back. It is skipped
when Sphinx or a Chromium/Chrome binary is not installed.
"""

import pathlib
import re
import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# The landing page, a tutorial page and one generated API page.
PAGES = ["index.html", "quickstart.html",
         "api/generated/gradhpo.T1T2.html"]
# Elements whose text MathJax leaves alone (its own default list).
UNTYPESET = {"script", "noscript", "style", "textarea", "pre", "code"}
# Elements that make the browser fetch what their attribute names.
FETCHED = {("script", "src"), ("img", "src"), ("iframe", "src"),
           ("source", "src"), ("audio", "src"), ("video", "src"),
           ("link", "href")}
RAW_TEX = re.compile(r"\\[(\[]")
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)""")
CSS_IMPORT = re.compile(r"""@import\s+['"]([^'"]+)['"]""")
BROWSER_TIMEOUT_S = 120


def _browser():
    """The first Chromium-like browser found on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Page(HTMLParser):
    """What the checks need from one HTML document: element ids, every
    href/src, the math placeholders Sphinx wrote, the elements MathJax
    produced, inline CSS, and the text MathJax would have typeset."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.ids = set()
        self.links = []          # (tag, attribute, value)
        self.math_nodes = 0      # <span|div class="math ...">
        self.typeset = 0         # <mjx-container>
        self.errors = 0          # <mjx-merror>: TeX MathJax could not parse
        self.css = []            # <style> bodies and style="" attributes
        self.text = []           # text outside UNTYPESET elements
        self._skip = 0
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(key):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) is not None:
                self.links.append((tag, key, attrs[key]))
        if attrs.get("style"):
            self.css.append(attrs["style"])
        classes = (attrs.get("class") or "").split()
        if tag in ("span", "div") and "math" in classes:
            self.math_nodes += 1
        if tag == "mjx-container":
            self.typeset += 1
        if tag == "mjx-merror":
            self.errors += 1
        if tag in UNTYPESET:
            self._skip += 1
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag in UNTYPESET and self._skip:
            self._skip -= 1
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.css.append(data)
        if not self._skip:
            self.text.append(data)


def _render(browser, path, profile):
    """The DOM of ``path`` after Chromium has run its scripts offline."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-dev-shm-usage", "--no-first-run",
           "--no-default-browser-check", "--disable-extensions",
           "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-default-apps",
           # No network: every host name fails to resolve and anything
           # that would still go out is sent to a closed local port.
           "--host-resolver-rules=MAP * ~NOTFOUND",
           "--proxy-server=http://127.0.0.1:9",
           f"--user-data-dir={profile}",
           "--virtual-time-budget=10000", "--dump-dom", path.as_uri()]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True,
                                timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{browser} did not finish {path} within "
                    f"{BROWSER_TIMEOUT_S} s")
    assert result.returncode == 0 and "<html" in result.stdout, (
        f"{' '.join(cmd)} failed (exit {result.returncode}):\n"
        f"{result.stderr[-3000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory, docs_html):
    """The built docs and a function giving the rendered DOM of a page."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser on PATH (looked for "
                    f"{', '.join(BROWSERS)}); install Chromium to run this")
    html = docs_html
    profile = tmp_path_factory.mktemp("chromium-profile")
    cache = {}

    def rendered(page):
        if page not in cache:
            cache[page] = _Page(_render(browser, html / page, profile))
        return cache[page]

    return html, rendered


def _is_remote(url):
    """Whether loading ``url`` would need the network."""
    parts = urlsplit(url.strip())
    return parts.scheme in ("http", "https") or (
        not parts.scheme and bool(parts.netloc))


def _local_target(base, url):
    """The file ``url`` names, seen from the file ``base``, and its
    fragment; (None, None) for URLs that are not files (mailto:, data:,
    http:, ...)."""
    parts = urlsplit(url.strip())
    if parts.scheme == "file":
        return pathlib.Path(unquote(parts.path)), unquote(parts.fragment)
    if parts.scheme or parts.netloc:
        return None, None
    target = (base.parent / unquote(parts.path)) if parts.path else base
    return target.resolve(), unquote(parts.fragment)


@pytest.mark.parametrize("page", PAGES)
def test_math_is_typeset_without_network(site, page):
    html, rendered = site
    source = _Page((html / page).read_text(encoding="utf-8"))
    assert source.math_nodes > 0, f"{page} has no math to check"
    dom = rendered(page)
    assert dom.typeset >= source.math_nodes, (
        f"MathJax typeset {dom.typeset} of the {source.math_nodes} formulas "
        f"on {page}: it did not load without network")
    assert dom.errors == 0, f"MathJax reports {dom.errors} TeX errors on {page}"
    raw = [text.strip() for text in dom.text if RAW_TEX.search(text)]
    assert not raw, f"untypeset TeX left on {page}: {raw[:5]}"


@pytest.mark.parametrize("page", PAGES)
def test_page_fetches_nothing_from_the_network(site, page):
    html, rendered = site
    dom = rendered(page)
    remote = [value for tag, key, value in dom.links
              if (tag, key) in FETCHED and _is_remote(value)]
    remote += [url for css in dom.css for url in CSS_URL.findall(css)
               if _is_remote(url)]
    assert not remote, f"{page} loads from the network: {remote}"


@pytest.mark.parametrize("page", PAGES)
def test_page_has_no_broken_links(site, page):
    html, rendered = site
    base = (html / page).resolve()
    dom = rendered(page)
    ids = {base: dom.ids}
    broken = []
    for _, _, value in dom.links:
        target, fragment = _local_target(base, value)
        if target is None:
            continue
        if not target.is_file():
            broken.append(f"{value} (no file {target})")
            continue
        if fragment and fragment != "top" and target.suffix == ".html":
            if target not in ids:
                ids[target] = _Page(target.read_text(encoding="utf-8")).ids
            if fragment not in ids[target]:
                broken.append(f"{value} (no id {fragment!r} in {target.name})")
    # Fonts and images that inline CSS (MathJax's own style sheet) names.
    for css in dom.css:
        for url in CSS_URL.findall(css):
            target, _ = _local_target(base, url)
            if target is not None and not target.is_file():
                broken.append(f"url({url}) in a style on the page")
    assert not broken, f"broken links on {page}:\n" + "\n".join(
        sorted(set(broken)))


def test_local_style_sheets_need_no_network(site):
    """The theme's CSS files only name files that exist in the build."""
    html, rendered = site
    base = (html / PAGES[0]).resolve()
    problems = []
    sheets = [_local_target(base, value)[0]
              for tag, key, value in rendered(PAGES[0]).links
              if tag == "link" and value.split("?")[0].endswith(".css")]
    assert sheets, "the index page links no style sheet"
    for sheet in filter(None, sheets):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        for url in CSS_URL.findall(text) + CSS_IMPORT.findall(text):
            if url.startswith("data:"):
                continue
            if _is_remote(url):
                problems.append(f"{sheet.name}: {url}")
                continue
            target, _ = _local_target(sheet, url)
            if target is not None and not target.is_file():
                problems.append(f"{sheet.name}: {url} (missing)")
    assert not problems, "style sheets need files that are not there:\n" + (
        "\n".join(problems))
