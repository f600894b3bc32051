"""Exercise 02: a user-registration service that lets nothing bad in and nothing secret out.

Read README.md in this folder for the full task. Run `pytest exercises/02_validation`
(or `grader check 02`) to see what is still missing.
"""

import hashlib
import os
from dataclasses import dataclass

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI(title="Accounts", version="0.2.0")


def hash_password(password: str) -> str:
    """Given: a salted scrypt hash. Lesson 05 covers password hashing properly.

    Hashing is deliberately slow CPU work: remember lesson 01 before you call it from an
    `async def` route.
    """
    salt = os.urandom(16)
    # The cost (n=2**12) is kept low so the graded tests stay fast; a real service uses a
    # higher cost, or Argon2 as in lesson 05.
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**12, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


@dataclass
class UserRecord:
    """Given: how the service stores a user internally. It holds a secret."""

    id: int
    username: str
    email: str
    age: int | None
    password_hash: str


# Given: the in-memory store. Each test imports this module afresh, so it starts empty.
USERS: dict[int, UserRecord] = {}


class UserCreate(BaseModel):
    """What a client may send to register."""

    # TODO: refuse unknown fields (model_config).
    # TODO: constraints: username pattern ^[a-z][a-z0-9_]{2,19}$, a real email address,
    #       age optional and between 13 and 120 (both included), password 8 to 128 characters.
    username: str
    email: str
    age: int | None = None
    password: str
    password_confirm: str

    # TODO: a field validator that trims and lower-cases the username BEFORE the pattern runs.
    # TODO: a field validator: the password needs at least one letter and one digit.
    # TODO: a model validator: password_confirm must equal password.


class UserOut(BaseModel):
    """What the service shows about a user: exactly these four fields."""

    # TODO: let UserOut.model_validate(record) read a UserRecord's attributes.
    id: int
    username: str
    email: str
    age: int | None


# TODO: a RequestValidationError handler: 422, {"detail": [{"type", "loc", "msg"}, ...]}, no "input".

# TODO: POST /users -> 201 with a UserOut; store a UserRecord with hash_password(password).

# TODO: GET /users/{user_id} -> 200 with a UserOut, or 404 {"detail": "User 7 not found"}.
