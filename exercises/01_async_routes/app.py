"""Exercise 01: your first FastAPI service.

Read README.md in this folder for the full task. Run `pytest exercises/01_async_routes`
(or `grader check 01`) to see what is still missing.
"""

from fastapi import FastAPI

# TODO: give the app the title "Hello Microservices" and the version "0.1.0".
app = FastAPI()

# Keep this catalogue as it is: the tests expect these three items at start.
ITEMS: dict[int, dict[str, str | int]] = {
    1: {"id": 1, "name": "keyboard"},
    2: {"id": 2, "name": "mouse"},
    3: {"id": 3, "name": "monitor"},
}


@app.get("/health")
async def health() -> dict[str, str]:
    # TODO: answer {"status": "ok"}
    return {}


# TODO: GET /greet/{name}?greeting=Hello&shout=false -> {"message": "Hello, Ada!"}
#       `shout` is a boolean; when true the whole message is upper-case.


# TODO: GET /add?a=2&b=3 -> {"result": 5}; both parameters are required integers.


# TODO: GET /items/{item_id} -> the item, or 404 {"detail": "Item 7 not found"}


# TODO: DELETE /items/{item_id} -> 204 with no body, or 404 {"detail": "Item 7 not found"} when the
#       item does not exist.


# TODO: GET /wait?seconds=0.1 -> {"waited": 0.1} after waiting that long, without blocking
#       other requests. `seconds` defaults to 0.1 and must lie between 0 and 2 (both allowed).
