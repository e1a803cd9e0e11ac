"""The explorer's ``guard``: a half-written artifact gets the reload hint; any other error is shown as what it
is (an import failing from a checkout root used to read as "a stage is still writing this run dir")."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest


def _page(kind: str):
    """A one-widget page: ``guard`` around a read that fails with ``kind``'s error (the source runs in AppTest)."""
    import json

    from saetune.app import _common as ui

    errors = {"json": lambda: json.loads('{"half": '), "os": lambda: open("/nonexistent/x.json"),
              "import": lambda: __import__("saetune_no_such_module")}
    with ui.guard("the feature data"):
        errors[kind]()


@pytest.mark.parametrize("kind", ["json", "os"])
def test_read_errors_get_the_reload_hint(kind):
    at = AppTest.from_function(_page, args=(kind,)).run(timeout=60)
    assert len(at.error) == 1 and "still writing" in at.error[0].value
    assert "the feature data could not be read" in at.error[0].value


def test_other_errors_are_not_blamed_on_the_run_dir():
    at = AppTest.from_function(_page, args=("import",)).run(timeout=60)
    assert len(at.error) == 1, [e.value for e in at.error]
    msg = at.error[0].value
    assert "still writing" not in msg and "ModuleNotFoundError" in msg and "saetune_no_such_module" in msg
    assert len(at.exception) == 1  # the traceback is shown
