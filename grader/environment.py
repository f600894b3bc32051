"""A predictable environment for graded tests of apps configured with pydantic-settings.

``BaseSettings`` reads environment variables and a ``.env`` file in the working directory, so
a variable left in a learner's shell, or a ``.env`` next to where pytest started, would change
what a graded test sees. ``settings_environment`` removes every variable of the app's prefix,
sets the ones given, and moves into a folder of the test's own; all of it is undone on exit.

    with settings_environment("OBS_", folder, OBS_SECRET_KEY="..."):
        app = module.create_app()
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def settings_environment(prefix: str, folder: Path, **values: str) -> Iterator[pytest.MonkeyPatch]:
    """No ``prefix*`` variable but ``values``, and ``folder`` as the working directory."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.upper().startswith(prefix.upper()):
                patch.delenv(name)
        patch.chdir(folder)  # where pydantic-settings looks for .env
        for name, value in values.items():
            patch.setenv(name, value)
        yield patch
