"""The one progress bar: drawn for a person at a terminal, silent in notebooks, tests and logs."""
from minillm.progress import progress


def test_silent_where_stderr_is_not_a_terminal(capsys):
    assert list(progress(range(3), desc="quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_drawn_when_asked_and_never_when_told_not_to(capsys):
    assert list(progress(range(3), desc="asked", show=True)) == [0, 1, 2]
    assert "asked" in capsys.readouterr().err
    list(progress(range(3), desc="never", show=False))
    assert capsys.readouterr().err == ""
