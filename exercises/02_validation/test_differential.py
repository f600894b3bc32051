"""Differential tests for exercise 02: for the same requests, your app answers as the reference does.

The requests come from the reference's OpenAPI document and the `[differential]` table of
exercise.toml (which says what is compared and which task each input belongs to). A failure
shows the shortest sequence of requests found, both answers, and where they differ.
"""

import hashlib

import pytest

from grader import differential


def quick_hash(password: str) -> str:
    """Stands in for the given hash_password: scrypt is slow on purpose, and no answer shows the hash."""
    return "scrypt$quick$" + hashlib.sha256(password.encode()).hexdigest()


def quick_hashing(module) -> None:
    if callable(getattr(module, "hash_password", None)):
        module.hash_password = quick_hash


def stored_users(module) -> dict:
    """What USERS holds, through the names the README promises (a hash is salted: only whether
    it came from hash_password, whose hashes start with "scrypt$", is compared)."""
    return {user_id: {"username": record.username, "email": record.email, "age": record.age,
                      "password_hash from hash_password": str(record.password_hash).startswith("scrypt$")}
            for user_id, record in module.USERS.items()}


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, prepare=quick_hashing, state=stored_users)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
