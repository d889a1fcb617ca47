"""Progress output: tqdm on a terminal, one plain line per tenth (or interval) in a log."""

import io

from ptpeft_kernels._progress import LineProgress, progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_a_terminal_gets_a_bar():
    log = io.StringIO()
    bar = progress(total=1000, desc="stage", stream=log)
    assert isinstance(bar, LineProgress)
    for i in range(1000):
        bar.update(1)
        if i == 500:
            bar.set_postfix(loss="1.2345")
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10  # one per tenth; close() adds none after 1000/1000
    assert lines[0].startswith("stage: 100/1000 (10%)") and lines[-1].startswith("stage: 1000/1000 (100%)")
    assert "loss=1.2345" in lines[-1] and "loss" not in lines[4]
    # Iteration, a start part-way (a resumed stage) and a time interval shorter than a tenth.
    log = io.StringIO()
    assert list(progress(range(3), desc="eval", stream=log)) == [0, 1, 2]
    assert log.getvalue().splitlines()[-1].startswith("eval: 3/3 (100%)")
    log = io.StringIO()
    bar = progress(total=100, initial=95, desc="s", stream=log, interval_s=0.0)
    bar.update(1)
    bar.close()
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]]
    assert log.getvalue().startswith("s: 96/100 (96%)")
    silent = io.StringIO()
    bar = progress(total=10, desc="x", stream=silent, disable=True)
    bar.update(10)
    bar.close()
    assert silent.getvalue() == ""
    term = _Terminal()
    bar = progress(total=3, desc="t", stream=term)
    assert not isinstance(bar, LineProgress) and type(bar).__module__.startswith("tqdm")
    bar.close()
