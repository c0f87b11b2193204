"""Uploaded files -> checked plain text -> token-aware chunks.

In: a file name and its bytes (from the browser, the API or a path), the size limit, and a
token-offset function (the embedder's own tokenizer). Out: an `Extracted` (title, kind, text, sha256)
and a list of `Chunk` spans, each at most `chunk_tokens` model tokens, overlapping by about
`overlap` tokens, cut at paragraph or sentence ends where one is near.

Everything that can be wrong with an upload is refused here with an `IngestError` that says what
and why, before anything is stored: unsupported type, empty file, over the size limit, corrupt or
encrypted PDF, binary data under a text name, a file name with path tricks, no extractable text.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

SUPPORTED = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf", ".html": "html",
             ".htm": "html"}
MAX_NAME_CHARS = 200
# Magic numbers of common binary formats, to say what a mislabelled file really is.
_MAGIC = {b"%PDF-": "a PDF", b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
          b"PK\x03\x04": "a ZIP archive (or an Office document)", b"\x7fELF": "an executable",
          b"\x1f\x8b": "a gzip archive", b"MZ": "a Windows executable", b"\xd0\xcf\x11\xe0": "an old Office file"}


class IngestError(ValueError):
    """An upload that cannot be ingested; the message is meant for the person who uploaded it."""


class DocumentTooLarge(IngestError):
    """Past a per-document cap (extracted text, chunks): the HTTP ways in answer 413.

    A small compressed file can expand to far more text than its size suggests (a PDF's content
    streams are deflated), so the size limit on the upload alone does not bound the work.
    """

    status = 413
    too_large = True  # what the ways in look for (assistant/actions/library.py maps it to TooLarge)


# Decoded PDF content (page streams and the forms they draw) allowed per extracted character: text
# operators take a few bytes per character, so a real document stays far below it, and pypdf's parser
# is not asked to read megabytes of stream that could never fit under the text cap.
PDF_STREAM_BYTES_PER_CHAR = 25


@dataclass(frozen=True)
class Extracted:
    filename: str
    kind: str  # "text", "markdown", "pdf", "html"
    title: str
    text: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # character span in Extracted.text
    end: int
    text: str
    tokens: int


# ---------------------------------------------------------------------------------------- checks
def check_filename(filename: str) -> tuple[str, str]:
    """(stem, lower-case suffix) of a plain file name; refuses paths and odd characters."""
    if not isinstance(filename, str) or not filename.strip():
        raise IngestError("the file has no name")
    name = unicodedata.normalize("NFC", filename)
    if len(name) > MAX_NAME_CHARS:
        raise IngestError(f"the file name is {len(name)} characters long; the limit is {MAX_NAME_CHARS}")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise IngestError(f"the file name {name!r} contains control characters")
    if "/" in name or "\\" in name or ":" in name:
        raise IngestError(f"the file name {name!r} contains a path; upload a plain file name like 'notes.md'")
    if name.strip() != name or name.startswith(".") or name in (".", ".."):
        raise IngestError(f"the file name {name!r} is not allowed (hidden, dot or padded with spaces)")
    p = PurePosixPath(name)
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED:
        kinds = ", ".join(sorted(SUPPORTED))
        raise IngestError(f"'{name}': unsupported file type {suffix or '(none)'}; supported: {kinds}")
    if not p.stem.strip():
        raise IngestError(f"the file name {name!r} has no name before the extension")
    return p.stem, suffix


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_size(size: int, limit: int, filename: str) -> None:
    if size == 0:
        raise IngestError(f"'{filename}' is empty")
    if size > limit:
        raise IngestError(f"'{filename}' is {human_size(size)}; the upload limit is {human_size(limit)}")


def _binary_kind(data: bytes) -> str | None:
    for magic, what in _MAGIC.items():
        if data.startswith(magic):
            return what
    return None


def decode_text(data: bytes, filename: str) -> str:
    """UTF-8 (or UTF-16 with a byte-order mark) text; anything else is refused as binary."""
    what = _binary_kind(data)
    if what:
        raise IngestError(f"'{filename}' is {what}, not text; rename it or upload the right file")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise IngestError(f"'{filename}' is not valid UTF-16 text: {exc}") from exc
    else:
        if b"\x00" in data:
            raise IngestError(f"'{filename}' contains binary data (NUL bytes), not text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise IngestError(
                f"'{filename}' is not UTF-8 text (byte {exc.start}); save it as UTF-8 or upload it as PDF"
            ) from exc
    text = text.removeprefix("\ufeff")  # a byte-order mark is an encoding detail, not content
    control = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r\f")
    if control > max(8, len(text) // 100):
        raise IngestError(f"'{filename}' looks like binary data: {control} control characters")
    return text


# ---------------------------------------------------------------------------------------- extraction
def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t\f\v]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def too_much_text(filename: str, max_chars: int, found: int | None = None) -> DocumentTooLarge:
    amount = f"{found}" if found is not None else f"more than {max_chars}"
    return DocumentTooLarge(f"'{filename}' holds {amount} characters of text; the limit per document is "
                            f"{max_chars}. Split it into smaller documents.")


def _stream_bytes(obj: Any, seen: set[int]) -> int:
    """Decoded bytes of a page's content streams and of the form XObjects it draws (each once)."""
    total = 0
    contents = obj.get_contents() if hasattr(obj, "get_contents") else None
    if contents is not None:
        total += len(contents.get_data())
    resources = obj.get("/Resources")
    xobjects = resources.get_object().get("/XObject") if resources is not None else None
    for ref in (xobjects.get_object().values() if xobjects is not None else ()):
        form = ref.get_object()
        key = getattr(ref, "idnum", id(form))
        if key in seen or form.get("/Subtype") != "/Form":
            continue
        seen.add(key)
        total += len(form.get_data()) + _stream_bytes(form, seen)
    return total


def _pdf_pages(reader: Any, filename: str, max_chars: int | None) -> list[str]:
    """Each page's text, refusing (before pypdf parses it) a stream budget or text past `max_chars`."""
    pages: list[str] = []
    total = 0
    budget = None if max_chars is None else max_chars * PDF_STREAM_BYTES_PER_CHAR
    streams = 0
    seen: set[int] = set()
    for page in reader.pages:
        if budget is not None:
            streams += _stream_bytes(page, seen)
            if streams > budget:
                raise too_much_text(filename, max_chars)  # type: ignore[arg-type]
        text = page.extract_text() or ""
        total += len(text)
        if max_chars is not None and total > max_chars:
            raise too_much_text(filename, max_chars)
        pages.append(text)
    return pages


def _pdf_text(data: bytes, filename: str, max_chars: int | None = None) -> tuple[str, str | None]:
    from pypdf import PdfReader

    if not data.startswith(b"%PDF-"):
        raise IngestError(f"'{filename}' is not a PDF (no %PDF header); the file is corrupt or misnamed")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise IngestError(f"'{filename}' is password-protected; upload an unprotected copy")
        if len(reader.pages) == 0:
            raise IngestError(f"'{filename}' is a corrupt PDF: no readable pages")
        pages = _pdf_pages(reader, filename, max_chars)
        meta_title = reader.metadata.title if reader.metadata else None
    except IngestError:
        raise
    except Exception as exc:  # pypdf raises many types on damaged files; each means "corrupt PDF"
        raise IngestError(f"'{filename}' is a corrupt PDF: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join(pages), (str(meta_title).strip() or None) if meta_title else None


def _html_text(data: bytes, filename: str) -> tuple[str, str | None]:
    from bs4 import BeautifulSoup

    text = decode_text(data, filename)
    soup = BeautifulSoup(text, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    return soup.get_text("\n"), title or None


def _markdown_title(text: str) -> str | None:
    m = re.search(r"^#{1,2}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def extract(filename: str, data: bytes, max_bytes: int, title: str | None = None,
            max_chars: int | None = None) -> Extracted:
    """Check and read one upload; raises `IngestError` for anything that is not a usable document
    (`DocumentTooLarge` when its text passes `max_chars`, found while extracting, not after)."""
    stem, suffix = check_filename(filename)
    if not isinstance(data, (bytes, bytearray)):
        raise IngestError(f"'{filename}': expected the file's bytes, got {type(data).__name__}")
    check_size(len(data), max_bytes, filename)
    kind = SUPPORTED[suffix]
    found_title: str | None
    if kind == "pdf":
        raw, found_title = _pdf_text(bytes(data), filename, max_chars)
    elif kind == "html":
        raw, found_title = _html_text(bytes(data), filename)
    else:
        raw = decode_text(bytes(data), filename)
        found_title = _markdown_title(raw) if kind == "markdown" else None
    text = _clean(raw)
    if max_chars is not None and len(text) > max_chars:
        raise too_much_text(filename, max_chars, len(text))
    if not text:
        hint = " (a scanned PDF has no text layer; OCR it first)" if kind == "pdf" else ""
        raise IngestError(f"'{filename}' contains no text{hint}")
    final_title = " ".join((title or found_title or stem).split())[:200]
    return Extracted(filename=filename, kind=kind, title=final_title, text=text,
                     sha256=hashlib.sha256(bytes(data)).hexdigest(), size=len(data))


# ---------------------------------------------------------------------------------------- chunking
def _is_paragraph_gap(text: str, a: int, b: int) -> bool:
    return "\n\n" in text[a:b]


def _is_sentence_end(text: str, end: int, next_start: int) -> bool:
    if end <= 0:
        return False
    if text[end - 1] in "。！？":  # full-width stops end a sentence without a following space
        return True
    return text[end - 1] in ".!?:;" and (next_start > end or "\n" in text[end:next_start])


def chunk_spans(text: str, offsets: list[tuple[int, int]], chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Split `text` into windows of at most `chunk_tokens` tokens that overlap by ~`overlap` tokens.

    `offsets` are the model tokens' character spans. A window ends at the last paragraph break in
    its second half, else the last sentence end there, else mid-text at a word boundary.
    """
    if chunk_tokens < 8 or not 0 <= overlap < chunk_tokens // 2:
        raise ValueError(f"need chunk_tokens >= 8 and 0 <= overlap < chunk_tokens/2, got {chunk_tokens}, {overlap}")
    n = len(offsets)
    chunks: list[Chunk] = []
    start = 0
    while start < n:
        end = min(start + chunk_tokens, n)
        if end < n:
            lo = start + chunk_tokens // 2
            gaps = range(end, lo, -1)
            para = next((j for j in gaps if _is_paragraph_gap(text, offsets[j - 1][1], offsets[j][0])), None)
            sent = next((j for j in gaps if _is_sentence_end(text, offsets[j - 1][1], offsets[j][0])), None)
            # Don't cut inside a word: at least back off to a token that starts after a gap.
            word = next((j for j in gaps if offsets[j][0] > offsets[j - 1][1]), None)
            end = next((j for j in (para, sent, word) if j is not None), end)
        a, b = offsets[start][0], offsets[end - 1][1]
        chunks.append(Chunk(index=len(chunks), start=a, end=b, text=text[a:b], tokens=end - start))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        # Start the overlap on a word boundary too (word pieces and jamo share or abut offsets).
        snapped = nxt
        while snapped < end and offsets[snapped][0] <= offsets[snapped - 1][1]:
            snapped += 1
        start = snapped if snapped < end else nxt
    return chunks


def chunk_document(text: str, token_offsets: Callable[[str], list[tuple[int, int]]], chunk_tokens: int,
                   overlap: int) -> list[Chunk]:
    return chunk_spans(text, token_offsets(text), chunk_tokens, overlap)
