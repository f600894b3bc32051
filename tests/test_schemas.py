"""grader.schemas: jsonschema without building rfc3987_syntax's grammars at import, and nothing lost."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_iri_formats_are_checked_by_the_real_module_once_asked_for():
    out = run(
        "import sys\n"
        "from grader.schemas import jsonschema, kubernetes_validate\n"
        "print('rfc3987_syntax' in sys.modules)\n"
        "checker = jsonschema.FormatChecker()\n"
        "print(checker.conforms('https://example.com/caf\\u00e9', 'iri'), checker.conforms('not an iri', 'iri'),\n"
        "      checker.conforms('#frag', 'iri-reference'), checker.conforms('a b', 'iri-reference'))\n"
        "print(type(sys.modules['rfc3987_syntax'].__file__).__name__)\n"
    )
    assert out.splitlines() == ["False", "True False True False", "str"]


def test_a_later_import_of_rfc3987_syntax_gets_the_real_module():
    out = run(
        "import grader.schemas, rfc3987_syntax\n"
        "print(rfc3987_syntax.is_valid_syntax('iri', 'https://example.com/'), bool(rfc3987_syntax.__file__))\n"
    )
    assert out == "True True"
