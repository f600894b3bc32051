"""How the differential grader sends its requests (grader.differential.AppRunner): each in a task of
its own, as a server does, while the worker threads of ``run_in_threadpool`` are reused from one
request to the next instead of one new thread per request."""

import asyncio
import contextvars
import threading
import time

import pytest
from fastapi import FastAPI

from grader import differential

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="nothing")


def build(threads: list[threading.Thread] | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/thread")
    def thread() -> dict:  # a plain def: FastAPI runs it in a worker thread
        if threads is not None:
            threads.append(threading.current_thread())  # the thread object itself: an ident may be reused
        return {"ok": True}

    @app.get("/context/{value}")
    async def context(value: str) -> dict:
        before = SEEN.get()
        SEEN.set(value)  # never reset: a later request must not see it
        return {"before": before}

    @app.get("/hang")
    async def hang() -> dict:
        await asyncio.sleep(60)
        return {}

    @app.get("/crash")
    async def crash() -> dict:
        raise KeyError("boom")

    return app


THREADS: list[threading.Thread] = []


@pytest.fixture
def runner():
    THREADS.clear()
    loop = asyncio.new_event_loop()
    runner = differential.AppRunner(build(THREADS), loop)
    runner.start()
    yield runner
    runner.stop()
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def get(runner: differential.AppRunner, path: str) -> differential.Answer:
    return runner.send(differential.Request("GET", path))


def test_the_worker_thread_is_reused_and_stops_with_the_app(runner):
    for _ in range(6):
        assert get(runner, "/thread").status == 200
    assert len(set(THREADS)) == 1, f"one worker thread for six requests in a row, not {len(set(THREADS))}"
    assert THREADS[0].is_alive(), "the worker waits for the next request"
    runner.stop()
    THREADS[0].join(5)
    assert not THREADS[0].is_alive(), "stopping the app stops its worker threads"


def test_each_request_has_a_context_of_its_own(runner):
    assert get(runner, "/context/first").json() == {"before": "nothing"}
    assert get(runner, "/context/second").json() == {"before": "nothing"}, \
        "a context variable set by one request leaks into the next"


def test_a_hung_request_is_an_answer_and_the_app_answers_the_next(runner, monkeypatch):
    monkeypatch.setattr(differential, "ANSWER_SECONDS", 0.2)
    started = time.monotonic()
    answer = get(runner, "/hang")
    assert answer.crash == differential.HUNG
    assert time.monotonic() - started < 30
    assert get(runner, "/crash").crash.startswith("KeyError")
    assert get(runner, "/context/x").status == 200


def test_a_session_leaves_no_thread_behind():
    module = type("Module", (), {"app": build()})
    promises = differential.Promises.parse({"operations": {"GET /thread": {"task": "t"}}})
    before = set(threading.enumerate())
    session = differential.Session(lambda: module, lambda: module, promises)
    session.check("t")
    left = [t for t in threading.enumerate() if t not in before]
    for thread in left:
        thread.join(5)
    assert not [t for t in left if t.is_alive()]
