"""Bounded text for messages: cut at a line's end, never in the middle of a path."""

from __future__ import annotations


def bounded(text: str, limit: int = 4000) -> str:
    """``text`` cut to about ``limit`` characters at a line's end, never in the middle of a path."""
    if len(text) <= limit:
        return text
    kept, size = [], 0
    lines = text.splitlines()
    for line in lines:
        if size + len(line) + 1 > limit and kept:
            break
        kept.append(line if len(line) <= limit else line[:limit] + " …")
        size += len(line) + 1
    return "\n".join(kept) + f"\n… ({len(lines) - len(kept)} more lines: run pytest on the exercise to see them all)"


def one_line(message: str, width: int = 160) -> str:
    """A failure's message in one line: its "expected:" line when it has one, else its first line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = next((line for line in lines if line.startswith("expected:")), lines[0])
    return line if len(line) <= width else line[: width - 2] + " …"
