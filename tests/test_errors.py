import inspect

import pytest

from transferline import errors, stagekit

from conftest import REPO

KNOWN = [
    c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
]


def test_every_known_error_derives_from_the_one_base():
    assert len(KNOWN) >= 8
    assert all(issubclass(c, errors.TransferlineError) for c in KNOWN)


@pytest.mark.parametrize("error", KNOWN, ids=lambda c: c.__name__)
def test_the_stage_harness_reports_each_as_one_paragraph(error, capsys):
    def body(p):
        raise error("what went wrong, and the fix")

    argv = ["--params", str(REPO / "params.yaml")]
    assert stagekit.main("split", body, argv, tracked=False) == 2
    assert capsys.readouterr().err == "ERROR in stage 'split': what went wrong, and the fix\n"
