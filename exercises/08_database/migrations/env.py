"""Alembic's environment for the library service: the async engine, the app's own settings.

Alembic runs this file for every command. It takes the database URL from the service's
`Settings` (DATABASE_URL), never from alembic.ini, and compares against `Base.metadata` from
models.py, so `alembic check` fails as soon as the models and the migrations disagree.

A program that runs Alembic itself (the graded tests, a deploy script) may hand over the
settings and the metadata in `Config.attributes`; the `alembic` command imports them from the
service's package (the folder that holds alembic.ini).
"""

import asyncio
import importlib
import sys
from logging.config import fileConfig
from pathlib import Path
from types import ModuleType
from typing import Any

from alembic import context
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

config = context.config
if config.config_file_name is not None and not config.attributes.get("quiet"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def service_module(name: str) -> ModuleType:
    """`app` or `models` of the service whose folder holds migrations/, imported as its package."""
    folder = Path(__file__).resolve().parents[1]
    if str(folder.parent) not in sys.path:
        sys.path.insert(0, str(folder.parent))
    return importlib.import_module(f"{folder.name}.{name}")


def database_url() -> str:
    settings: Any = config.attributes.get("settings") or service_module("app").Settings()
    return settings.database_url


def target_metadata() -> MetaData:
    metadata = config.attributes.get("metadata")
    return metadata if metadata is not None else service_module("models").Base.metadata


def run_offline() -> None:
    """`alembic upgrade head --sql`: write the SQL for a DBA to review instead of running it."""
    context.configure(url=database_url(), target_metadata=target_metadata(), literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def migrate(connection: Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table
    # instead, and on PostgreSQL it is a plain ALTER. compare_type is on by default in Alembic.
    context.configure(connection=connection, target_metadata=target_metadata(), render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    # The same async driver as the app (aiosqlite, asyncpg); Alembic itself is synchronous, so
    # the migration runs inside run_sync on the connection. NullPool: a one-off command keeps
    # no connections.
    engine = async_engine_from_config({"sqlalchemy.url": database_url()}, prefix="sqlalchemy.",
                                      poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(migrate)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_online())
