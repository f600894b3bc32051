"""Exercise 08: a library service on SQLAlchemy 2 async (aiosqlite by default).

Read README.md in this folder for the full task. The layers: routes (this file) ->
Library (services.py) -> AsyncSession -> models (models.py); API schemas in schemas.py.
Run `pytest exercises/08_database` (or `grader check 08`) to see what is still missing.
"""

from fastapi import FastAPI
from pydantic_settings import BaseSettings


class Settings(BaseSettings):
    """Configuration from the environment."""

    # TODO: database_url, read from the environment variable DATABASE_URL,
    #       defaulting to "sqlite+aiosqlite:///./library.db".
    # TODO: database_lock_timeout (DATABASE_LOCK_TIMEOUT, seconds, default 5.0): the engine's
    #       pool_timeout and SQLite's connect_args={"timeout": ...}.


# TODO: get_session(request) - a dependency with yield: one AsyncSession per request from
#       app.state.sessionmaker; commit when the route succeeded, roll back when it raised,
#       and close it in every case. Declare it with Depends(get_session, scope="function").


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    # TODO: a lifespan that creates the engine from settings.database_url, creates the tables,
    #       keeps app.state.engine and app.state.sessionmaker (expire_on_commit=False), and
    #       disposes of the engine at shutdown.
    app = FastAPI(title="Library", version="0.8.0")

    # TODO: the routes in README.md, each calling the Library service:
    #   GET  /health/db
    #   POST /authors                    GET /authors/{author_id}
    #   POST /authors/{author_id}/books  GET /books?offset=0&limit=20&author_id=
    # Every error is a problem (RFC 9457; problems.py is given, read its docstring):
    # call install_problem_details(app), then add exception handlers that turn the service's
    # NotFound into a 404 problem and Conflict into a 409 one (problem_response(request, 404, ...)).
    # Bound every integer where FastAPI reads it: author_id 1..MAX_INT (Path, and the Query
    # filter), offset 0..MAX_INT, limit 1..100. Declare every error each route answers with
    # responses=problem_responses(404, ...), and FastAPI(..., responses=problem_responses(422)).
    # TODO: a busy database (SQLite's SQLITE_BUSY/SQLITE_LOCKED, exc.orig.sqlite_errorcode; the pool's
    #       TimeoutError) is a 503 problem with Retry-After on every route; any other error stays a 500.

    return app


app = create_app()
