"""Incremental decoder for ``Content-Encoding: aws-chunked`` request bodies (pure, no I/O).

Two variants reach an S3 endpoint:

* signed chunks (``x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]``)::

      <hex-size>;chunk-signature=<sig>\\r\\n<data>\\r\\n … 0;chunk-signature=<sig>\\r\\n[trailers]\\r\\n

  each signature chaining from the previous one (the first from the request's own signature);
* unsigned chunks with trailing checksums (``STREAMING-UNSIGNED-PAYLOAD-TRAILER``), which current
  botocore sends over HTTPS::

      <hex-size>\\r\\n<data>\\r\\n … 0\\r\\nx-amz-checksum-crc32:<base64>\\r\\n\\r\\n

The transport's own ``Transfer-Encoding: chunked`` framing is removed by the HTTP server first;
this decoder sees the aws-chunked stream. :meth:`AwsChunkedDecoder.feed` takes any slice of the
stream (down to one byte) and returns the payload bytes decoded so far (memoryviews of the
input: never copied, never byte by byte), so a body is never held whole in memory, and what the
decoder keeps between calls is bounded whatever the chunk sizes: one line buffer
(:data:`MAX_LINE`), one running hash, the previous signature. As S3 does, every chunk but the last one carrying data must hold at least
:data:`MIN_CHUNK` bytes (AWS: "the chunk size must be at least 8 KB … except the last chunk";
botocore sends 1 MiB chunks): a stream of tiny chunks is refused at its second chunk rather than
costing a signature check per byte. Errors raise :class:`ChunkedError` with the S3 error code to
answer with.

Hand-written: no maintained Python library decodes aws-chunked bodies on the server side.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

from stdaemon.s3 import checksums as s3_checksums
from stdaemon.s3.sigv4 import EMPTY_SHA256, ChunkSigner

MAX_LINE = 4096
MAX_TRAILER_LINES = 32
#: Smallest chunk S3 accepts, except the last one carrying data.
MIN_CHUNK = 8192

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AwsChunkedDecoder:
    """Decode an aws-chunked stream incrementally.

    :param signer: verify each chunk's ``chunk-signature`` (``None`` for unsigned chunks).
    :param trailer_names: the trailers announced in ``x-amz-trailer``; every one must arrive.
        ``x-amz-checksum-*`` trailers are verified against the decoded payload.
    :param signed_trailer: the trailers carry ``x-amz-trailer-signature`` (signed trailer variant).
    :param decoded_length: ``x-amz-decoded-content-length`` when sent; checked at the end.
    :param max_decoded: largest payload accepted (``EntityTooLarge`` beyond it).
    :param min_chunk: smallest accepted chunk except the last one carrying data
        (``InvalidChunkSizeError``).
    """

    def __init__(
        self,
        *,
        signer: ChunkSigner | None = None,
        trailer_names: Iterable[str] = (),
        signed_trailer: bool = False,
        decoded_length: int | None = None,
        max_decoded: int | None = None,
        min_chunk: int = MIN_CHUNK,
    ) -> None:
        self._signer = signer
        self._previous = signer.seed_signature if signer else ""
        self._trailer_names = {name.strip().lower() for name in trailer_names if name.strip()}
        self._signed_trailer = signed_trailer
        self._decoded_length = decoded_length
        self._max_decoded = max_decoded
        self._min_chunk = min_chunk
        self._short_chunk = 0  # size of a chunk under min_chunk: it must have been the last one
        self._chunks = 0
        self._state = _SIZE
        self._buffer = bytearray()
        self._remaining = 0
        self._chunk_signature = ""
        self._chunk_hash = None
        self._trailer_lines = 0
        self.decoded_bytes = 0
        self.trailers: dict[str, str] = {}
        self._checksums = {}
        for name in self._trailer_names:
            algorithm = s3_checksums.algorithm_from_header(name)
            if algorithm is not None:
                self._checksums[name] = s3_checksums.new_checksum(algorithm)
            elif not name.startswith("x-amz-checksum-"):
                continue
            else:
                raise ChunkedError("InvalidRequest", f"unsupported trailer {name}")

    @property
    def done(self) -> bool:
        return self._state == _DONE

    # ------------------------------------------------------------------ feeding

    def feed(self, data: bytes | bytearray) -> list[memoryview]:
        """Consume the next slice of the stream; return decoded payload pieces (maybe empty): views
        of ``data``, valid while ``data`` is (the caller writes and hashes them, then drops them)."""
        out: list[bytes] = []
        view = memoryview(data)
        pos = 0
        length = len(view)
        while pos < length:
            if self._state == _DATA:
                take = min(self._remaining, length - pos)
                piece = view[pos:pos + take]  # a view of the input: the payload is not copied
                pos += take
                self._remaining -= take
                self._account(piece)
                out.append(piece)
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            if self._state == _DONE:
                if bytes(view[pos:]).strip(b"\r\n"):
                    raise ChunkedError("InvalidRequest", "data after the end of the aws-chunked body")
                return out
            # line-oriented states: collect up to CRLF
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._buffer += view[pos:]
                if len(self._buffer) > MAX_LINE:
                    raise ChunkedError("InvalidRequest", "aws-chunked line too long")
                return out
            self._buffer += view[pos:newline + 1]
            pos = newline + 1
            if len(self._buffer) > MAX_LINE:
                raise ChunkedError("InvalidRequest", "aws-chunked line too long")
            line = bytes(self._buffer)
            self._buffer.clear()
            if not line.endswith(b"\r\n"):
                raise ChunkedError("InvalidRequest", "aws-chunked lines must end with CRLF")
            self._line(line[:-2])
        return out

    def finish(self) -> None:
        """The stream ended: raise ``IncompleteBody`` unless it was complete and every check passed."""
        if self._state == _TRAILER and not self._buffer:
            self._end()
        if self._state != _DONE:
            raise ChunkedError("IncompleteBody", "The request body terminated unexpectedly")

    # ------------------------------------------------------------------ internals

    def _account(self, piece: memoryview) -> None:
        self.decoded_bytes += len(piece)
        if self._max_decoded is not None and self.decoded_bytes > self._max_decoded:
            raise ChunkedError("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        if self._chunk_hash is not None:
            self._chunk_hash.update(piece)
        for state in self._checksums.values():
            state.update(piece)

    def _line(self, line: bytes) -> None:
        if self._state == _SIZE:
            self._size_line(line)
        elif self._state == _DATA_END:
            if line:
                raise ChunkedError("InvalidRequest", "aws-chunked chunk is longer than its declared size")
            self._verify_chunk()
            self._state = _SIZE
        elif self._state == _TRAILER:
            self._trailer_line(line)

    def _size_line(self, line: bytes) -> None:
        size_text, _, extensions = line.partition(b";")
        size_text = size_text.strip()
        try:
            if not size_text or len(size_text) > 16:
                raise ValueError
            size = int(size_text, 16)
        except ValueError:
            raise ChunkedError("InvalidRequest", "aws-chunked chunk size is not hexadecimal") from None
        signature = ""
        for extension in extensions.split(b";") if extensions else ():
            name, _, value = extension.partition(b"=")
            if name.strip() == b"chunk-signature":
                signature = value.strip().decode("ascii", "replace")
        signed = self._signer is not None
        if signed and not signature:
            raise ChunkedError("SignatureDoesNotMatch", "aws-chunked chunk has no chunk-signature")
        self._chunk_signature = signature
        self._chunk_hash = hashlib.sha256() if signed else None
        if size == 0:
            self._verify_chunk()
            self._state = _TRAILER
            return
        self._chunks += 1
        if self._short_chunk:
            raise ChunkedError("InvalidChunkSizeError",
                               f"Only the last chunk is allowed to have a size less than {self._min_chunk} bytes "
                               f"(chunk {self._chunks - 1} has {self._short_chunk})")
        if size < self._min_chunk:
            self._short_chunk = size
        if self._max_decoded is not None and self.decoded_bytes + size > self._max_decoded:
            raise ChunkedError("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        self._remaining = size
        self._state = _DATA

    def _verify_chunk(self) -> None:
        if self._signer is None:
            return
        digest = self._chunk_hash.hexdigest() if self._chunk_hash is not None else EMPTY_SHA256
        expected = self._signer.chunk_signature(self._previous, digest)
        if not hmac.compare_digest(expected.encode(), self._chunk_signature.encode("utf-8", "replace")):
            raise ChunkedError("SignatureDoesNotMatch", "aws-chunked chunk signature does not match")
        self._previous = expected
        self._chunk_hash = None

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._end()
            return
        self._trailer_lines += 1
        if self._trailer_lines > MAX_TRAILER_LINES:
            raise ChunkedError("InvalidRequest", "too many aws-chunked trailers")
        name, sep, value = line.partition(b":")
        if not sep:
            raise ChunkedError("InvalidRequest", "malformed aws-chunked trailer")
        key = name.strip().decode("latin-1").lower()
        self.trailers[key] = value.strip().decode("latin-1")

    def _end(self) -> None:
        missing = self._trailer_names - set(self.trailers)
        if missing:
            raise ChunkedError("IncompleteBody", f"missing trailer {sorted(missing)[0]}")
        if self._signed_trailer:
            self._verify_trailer_signature()
        for name, state in self._checksums.items():
            if not hmac.compare_digest(s3_checksums.b64(state.digest()).encode(), self.trailers[name].encode()):
                algorithm = name[len("x-amz-checksum-"):].upper()
                raise ChunkedError("BadDigest", f"The {algorithm} you specified did not match the calculated checksum.")
        if self._decoded_length is not None and self.decoded_bytes != self._decoded_length:
            raise ChunkedError("IncompleteBody", "the body length differs from x-amz-decoded-content-length")
        self._state = _DONE

    def _verify_trailer_signature(self) -> None:
        given = self.trailers.get("x-amz-trailer-signature", "")
        canonical = "".join(
            f"{name}:{value}\n" for name, value in self.trailers.items() if name != "x-amz-trailer-signature"
        )
        if self._signer is None:
            return
        expected = self._signer.trailer_signature(self._previous, hashlib.sha256(canonical.encode()).hexdigest())
        if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
            raise ChunkedError("SignatureDoesNotMatch", "aws-chunked trailer signature does not match")

    def checksum_b64(self, name: str) -> str | None:
        """The computed base64 value of a declared checksum trailer (after :meth:`finish`)."""
        state = self._checksums.get(name)
        return s3_checksums.b64(state.digest()) if state is not None else None
