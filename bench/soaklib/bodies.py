"""Bodies both ends can check without storing them: a stream of bytes derived from a seed.

Block k of the body with seed S is 64 KiB: the seed and k as two big-endian 64-bit numbers,
then random bytes drawn once per seed. A body handed to the wrong request carries another
seed in its first block; a body shifted, cut or spliced carries the wrong block numbers or
ends early; a flipped byte differs from the expected stream. So the receiving side compares
what arrives with what it must be, byte for byte, and can say which of these happened and
where, and the SHA-256 of both sides is reported as well.
"""

from __future__ import annotations

import functools
import hashlib
import random
import struct

BLOCK = 64 * 1024
_HEADER = struct.Struct(">QQ")


def seed_of(request_id: str) -> int:
    """A 63-bit seed from a request id, so both ends derive the same body from the id alone."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") >> 1


@functools.lru_cache(maxsize=64)
def _random_part(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK - _HEADER.size)


def block(seed: int, index: int) -> bytes:
    return _HEADER.pack(seed, index) + _random_part(seed)


def expected(seed: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of the body with this seed."""
    parts = []
    end = offset + length
    while offset < end:
        index, start = divmod(offset, BLOCK)
        take = min(BLOCK - start, end - offset)
        parts.append(block(seed, index)[start:start + take])
        offset += take
    return b"".join(parts)


def chunks(seed: int, size: int, chunk: int = BLOCK):  # noqa: ANN201 - a generator of bytes
    """The body in pieces of at most `chunk` bytes."""
    offset = 0
    while offset < size:
        take = min(chunk, size - offset)
        yield expected(seed, offset, take)
        offset += take


def sha256_of(seed: int, size: int) -> str:
    digest = hashlib.sha256()
    for piece in chunks(seed, size):
        digest.update(piece)
    return digest.hexdigest()


class BodyCheck:
    """Compares a body as it arrives with the one expected (`seed`, `size`).

    `problem` stays None while every byte so far is right; it names the first wrong
    thing: "foreign" (another body's bytes: a mix-up), "corrupt", or "too long".
    `complete` says whether exactly `size` right bytes arrived.
    """

    def __init__(self, seed: int, size: int):
        self.seed = seed
        self.size = size
        self.received = 0
        self.problem: str | None = None
        self.problem_offset: int | None = None
        self.digest = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.digest.update(data)
        if self.problem is None:
            if self.received + len(data) > self.size:
                self._fail("too long", self.size)
            else:
                want = expected(self.seed, self.received, len(data))
                if data != want:
                    self._locate(data, want)
        self.received += len(data)

    def _locate(self, data: bytes, want: bytes) -> None:
        at = next(i for i, (a, b) in enumerate(zip(data, want)) if a != b)
        offset = self.received + at
        start = offset - offset % BLOCK
        # A block header of another seed in the data: another request's body.
        header_at = start - self.received
        foreign = False
        if 0 <= header_at and header_at + _HEADER.size <= len(data):
            seed, _index = _HEADER.unpack_from(data, header_at)
            foreign = seed != self.seed
        self._fail("foreign" if foreign else "corrupt", offset)

    def _fail(self, problem: str, offset: int) -> None:
        self.problem = problem
        self.problem_offset = offset

    @property
    def complete(self) -> bool:
        return self.problem is None and self.received == self.size

    def sha256(self) -> str:
        return self.digest.hexdigest()
