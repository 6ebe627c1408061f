"""Malformed input to the public API ends in a documented exception or a correct result."""
from pathlib import Path

import pytest

from fuzz_cases import CASES, markdown


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case):
    if case.raises is None:
        if case.warns is None:
            result = case.call()
        else:
            with pytest.warns(case.warns) as caught:
                result = case.call()
            messages = " ".join(str(w.message) for w in caught if issubclass(w.category, case.warns))
            for word in case.words:
                assert word in messages, f"{case.name}: warning {messages!r} lacks {word!r}"
        assert case.check(result), f"{case.name}: wrong result {result}"
        return
    with pytest.raises(case.raises) as info:
        case.call()
    message = str(info.value)
    for word in case.words:
        assert word in message, f"{case.name}: message {message!r} lacks {word!r}"


def test_docs_list_every_case():
    doc = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"
    assert doc.read_text() == markdown(), "docs/robustness.md is stale: python tests/fuzz_cases.py > docs/robustness.md"
