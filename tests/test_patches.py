"""Mutants are diffs: they must apply exactly, or fail loudly."""

import pytest

from grader import patches

BEFORE = "a\nb\nc\nd\ne\nf\ng\n"


def roundtrip(after: str) -> str:
    description, changes = patches.parse(patches.make("Mutant: x.", {"app.py": (BEFORE, after)}))
    assert description == "Mutant: x."
    assert [c.path for c in changes] == ["app.py"]
    return patches.apply(BEFORE, changes[0])


@pytest.mark.parametrize("after", [
    "a\nb\nC\nd\ne\nf\ng\n",          # a change
    "a\nb\nd\ne\nf\ng\n",             # a removal
    "new\na\nb\nc\nd\ne\nf\ng\n",     # an insertion at the top
    "a\nb\nc\nd\ne\nf\ng\nend\n",     # an insertion at the end
    "A\nb\nc\nd\ne\nf\nG\n",          # two hunks
])
def test_a_made_diff_applies_back_to_the_same_text(after):
    assert roundtrip(after) == after


def test_a_diff_that_no_longer_fits_is_an_error():
    _, (change,) = patches.parse(patches.make("Mutant: x.", {"app.py": (BEFORE, BEFORE.replace("c", "C"))}))
    with pytest.raises(patches.PatchError, match="does not fit at line"):
        patches.apply(BEFORE.replace("b", "B"), change)


@pytest.mark.parametrize("text", ["just words, no diff", "--- a/app.py\nnot a plus line\n"])
def test_a_malformed_diff_is_an_error(text):
    with pytest.raises(patches.PatchError):
        patches.parse(text)
