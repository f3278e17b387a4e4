"""A one-page PDF the emulator serves at ``/_emulator/files/sample.pdf``: a document any demo or test can hand to
a job by URL (``difyq dev`` lists it)."""

from __future__ import annotations

from functools import cache

from starlette.requests import Request
from starlette.responses import Response

SAMPLE_NAME = "sample.pdf"
_TEXT = "difyq sample: a contract between Acme and Example, signed 2026-12-05."


@cache
def sample_pdf() -> bytes:
    """A valid PDF 1.4 of one page with one line of text (its cross-reference offsets computed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({_TEXT}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    document = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(document))
        document += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(document)
    document += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    document += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    document += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(document)


async def sample_file(request: Request) -> Response:
    """``GET /_emulator/files/sample.pdf``."""
    if request.path_params["name"] != SAMPLE_NAME:
        return Response("no such sample file\n", 404, media_type="text/plain")
    return Response(sample_pdf(), media_type="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="{SAMPLE_NAME}"'})
