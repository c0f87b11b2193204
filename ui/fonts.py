"""A Korean-capable font served by the product itself, so Korean never renders as empty boxes.

The page's own fonts (Gradio's bundled ones, or the system's) have no Hangul on many machines (a
server image, a fresh Linux desktop). `ui/static/fonts/hangul-fallback.woff2` is NanumGothic Regular
(SIL Open Font License 1.1, Debian's fonts-nanum) cut down to Hangul, CJK punctuation and full-width
forms (230 KB), renamed as the licence asks of a modified copy (ui/static/fonts/OFL.txt).

`mount_fonts(app)` serves it at `/fonts/<file>` from the package (a public route: a font is not a
secret, and the login page needs it too); `FONT_CSS` declares it with a `unicode-range`, so a browser
downloads it only for a page that shows Korean, and the page names it after its own fonts. Nothing is
fetched from another host.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response

FONT_DIR = Path(__file__).parent / "static" / "fonts"
FONTS = {"hangul-fallback.woff2": "font/woff2"}
FAMILY = "Hangul Fallback"
UNICODE_RANGE = "U+1100-11FF, U+3000-303F, U+3130-318F, U+AC00-D7A3, U+FF01-FF60"

FONT_CSS = f"""
@font-face {{ font-family: "{FAMILY}"; src: url("/fonts/hangul-fallback.woff2") format("woff2");
             unicode-range: {UNICODE_RANGE}; font-display: swap; }}
:root, .gradio-container {{
  --font: "Source Sans Pro", ui-sans-serif, system-ui, sans-serif, "{FAMILY}";
  --font-mono: "IBM Plex Mono", ui-monospace, Consolas, monospace, "{FAMILY}";
}}
body, textarea, input, button {{ font-family: var(--font), "{FAMILY}", sans-serif; }}
"""


def mount_fonts(app: FastAPI) -> None:
    """Serve the bundled fonts at /fonts/<file> (call before the page is mounted)."""

    @app.get("/fonts/{name}", include_in_schema=False)
    def font(name: str) -> Response:
        if name not in FONTS:
            return Response(status_code=404)
        return FileResponse(FONT_DIR / name, media_type=FONTS[name],
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})
