"""Make learner-controlled text (names, failure messages, program output) safe for each format.

HTML is escaped by Jinja2's autoescaping and JSON by the encoder; what is left is here:
spreadsheet formulas in CSV, characters XML 1.0 forbids, Markdown table syntax, and the
workflow commands that a CI log executes (``::set-output``, ``::error``, ``##[error]`` …).
"""

from __future__ import annotations

import re

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
# a line whose first non-blank characters are '::' or '##[' is a GitHub Actions workflow command
_CI_COMMAND = re.compile(r"^(\s*)(::|##\[)", re.MULTILINE)


# Characters that reorder or hide text when shown (Trojan Source, CVE-2021-42574): made visible.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BLANKS = " \u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"


def safe_text(text: str) -> str:
    """Learner-controlled text that every format can carry and no viewer misreads.

    A name that is not UTF-8 arrives with lone surrogates (``os.fsdecode``): its bytes are
    shown as ``\\xNN``; terminal escape sequences are dropped; other control characters
    (but newline and tab) and the bidirectional overrides are shown as escapes, so the text
    reads the same in a terminal, a spreadsheet, a browser and an editor.
    """
    text = _ANSI.sub("", str(text)).replace("\r\n", "\n")

    def surrogate(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"

    text = _SURROGATE.sub(surrogate, text)
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return _BIDI.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


def csv_cell(text: str) -> str:
    """A cell a spreadsheet shows as text, never evaluates (OWASP: prefix a quote), also when
    blanks come before the formula."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_START) or text.lstrip(_BLANKS).startswith(_FORMULA_START) else text


def xml_text(text: str) -> str:
    """Text that XML 1.0 can carry (ElementTree escapes markup; it does not drop control characters)."""
    return _XML_FORBIDDEN.sub("\ufffd", _ANSI.sub("", str(text)))


def ci_log(text: str) -> str:
    """Text that a CI runner prints without executing: workflow commands are broken up."""
    return _CI_COMMAND.sub(lambda m: m.group(1) + m.group(2)[0] + "\u200b" + m.group(2)[1:], _ANSI.sub("", str(text)))


def markdown_text(text: str) -> str:
    """One line of plain text in a Markdown table cell: no markup, no HTML, no workflow commands."""
    text = ci_log(str(text)).replace("\r", " ").replace("\n", " ")
    text = re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
