"""Security headers on every answer of the web app (`secure_headers`), applied where the
app hands its status and headers to the server, so routes, error pages and static files all
get them. Pure: the path and the headers in, the headers out.

- Every answer: `X-Content-Type-Options: nosniff`, so a browser never runs a file as a
  type it guessed.
- Pages (text/html): a Content-Security-Policy that lets the dashboard load only its own
  script, style sheet, images and fetches, and never be framed (`frame-ancestors 'none'`,
  against clickjacking of its buttons).
- The file trees other people's bytes come from (`/cache/servo/`: a clone of a repository
  that pull requests write to; `/image-deps/`): `Content-Security-Policy: sandbox`, and a
  file a browser would render as a document (HTML, SVG, XML) is served as `text/plain` and
  as a download, so nothing there runs script with the dashboard's origin.
"""

from __future__ import annotations

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SANDBOX_POLICY = "sandbox"
UNTRUSTED_TREES = ("/cache/servo/", "/image-deps/")
PLAIN = "text/plain"
_REPLACED = frozenset({"x-content-type-options", "content-security-policy", "content-disposition"})


def secure_headers(path: str, status: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` of the answer to `path` (with `status`, e.g. "200 OK") with the security
    headers added, and a document's Content-Type replaced under `UNTRUSTED_TREES`."""
    content_type = next((v for n, v in headers if n.lower() == "content-type"), "")
    out = [(n, v) for n, v in headers if n.lower() not in _REPLACED]
    out.append(("X-Content-Type-Options", "nosniff"))
    if path.startswith(UNTRUSTED_TREES):
        out.append(("Content-Security-Policy", SANDBOX_POLICY))
        # Only files: our own error pages under a tree stay pages (sandboxed all the same).
        if status.startswith("2") and renders_as_document(content_type):
            out = [(n, v) for n, v in out if n.lower() != "content-type"]
            out += [("Content-Type", PLAIN), ("Content-Disposition", "attachment")]
        else:
            out += [(n, v) for n, v in headers if n.lower() == "content-disposition"]
    elif "html" in content_type.lower():
        out.append(("Content-Security-Policy", PAGE_POLICY))
    else:
        out += [(n, v) for n, v in headers if n.lower() == "content-disposition"]
    return out


def renders_as_document(content_type: str) -> bool:
    """Whether a browser shown `content_type` may render it as a document that runs script:
    HTML, XHTML, SVG, and XML (which may be XHTML or pull in an XSLT)."""
    mime = content_type.partition(";")[0].strip().lower()
    return "html" in mime or "xml" in mime or "svg" in mime or mime == "text/xsl"
