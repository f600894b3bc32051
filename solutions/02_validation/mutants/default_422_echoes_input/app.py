"""Mutant: keeps FastAPI's default 422 handler, which echoes the submitted password back in `input`."""

import asyncio
import hashlib
import os
from dataclasses import dataclass
from typing import Annotated, Self

from fastapi import FastAPI, HTTPException, status
from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator, model_validator

app = FastAPI(title="Accounts", version="0.2.0")


def hash_password(password: str) -> str:
    """Given: a salted scrypt hash. Lesson 05 covers password hashing properly."""
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


USERS: dict[int, UserRecord] = {}


class UserCreate(BaseModel):
    """What a client may send to register. Anything else is refused, not ignored."""

    # extra="forbid": a client sending {"is_admin": true} gets a 422 instead of a silent drop,
    # and a later field with that name can never be set by a stray request.
    model_config = ConfigDict(extra="forbid")

    username: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{2,19}$")]
    email: EmailStr
    age: Annotated[int | None, Field(ge=13, le=120)] = None
    password: Annotated[str, Field(min_length=8, max_length=128)]
    password_confirm: str

    @field_validator("username", mode="before")
    @classmethod
    def normalise_username(cls, value: object) -> object:
        # mode="before" runs on the raw input, so " Ada_L " is cleaned up before the pattern checks it.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("password")
    @classmethod
    def password_has_letter_and_digit(cls, value: str) -> str:
        if not any(char.isalpha() for char in value) or not any(char.isdigit() for char in value):
            raise ValueError("password must contain at least one letter and one digit")
        return value

    @model_validator(mode="after")
    def passwords_match(self) -> Self:
        # Needs two fields at once, so it is a model validator, run after every field is valid.
        if self.password != self.password_confirm:
            raise ValueError("passwords do not match")
        return self


class UserOut(BaseModel):
    """What the service shows about a user: no password, no hash, ever."""

    # from_attributes: build it straight from a UserRecord (or an ORM row) by reading attributes.
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    email: EmailStr
    age: int | None


@app.post("/users", status_code=status.HTTP_201_CREATED, tags=["users"], summary="Register a user")
async def register(user: UserCreate) -> UserOut:
    # Hashing is deliberately slow CPU work: run it in a thread so the event loop keeps serving.
    password_hash = await asyncio.to_thread(hash_password, user.password)
    record = UserRecord(
        id=len(USERS) + 1,
        username=user.username,
        email=user.email,
        age=user.age,
        password_hash=password_hash,
    )
    USERS[record.id] = record
    return UserOut.model_validate(record)


@app.get("/users/{user_id}", tags=["users"], summary="Read a user's public profile")
async def read_user(user_id: int) -> UserOut:
    record = USERS.get(user_id)
    if record is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"User {user_id} not found")
    return UserOut.model_validate(record)
