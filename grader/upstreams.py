"""Stand-ins for a service's upstream in graded tests: answers that stream in piece by piece.

A gateway that promises to read no further than a limit is tested with an upstream whose body
arrives in chunks, each handed over only when the gateway asks for it; ``pulled`` then says how
much of the body the gateway read before it answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

JSON = {"content-type": "application/json"}


class Chunks(httpx.AsyncByteStream):
    """A body handed over one chunk at a time, when the reader asks; ``pulled`` counts the chunks read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.pulled = chunks, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


class Streaming(httpx.AsyncBaseTransport):
    """An upstream that answers every request 200 with ``chunks`` as a streamed body and ``headers``
    (JSON by default); ``requests`` keeps what it was sent, ``answers`` each body it streamed."""

    def __init__(self, chunks: list[bytes], headers: dict[str, str] | None = None) -> None:
        self.chunks, self.headers = chunks, headers or dict(JSON)
        self.requests: list[httpx.Request] = []
        self.answers: list[Chunks] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.answers.append(Chunks(self.chunks))
        return httpx.Response(200, headers=self.headers, stream=self.answers[-1], request=request)
