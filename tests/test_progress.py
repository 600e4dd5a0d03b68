"""Progress in a log: plain lines with rate and ETA every ~10 % or ~30 s; a tqdm bar only on a terminal."""
import io
import logging
import re
import time

from retro_lit.progress import ProgressLog, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "retro_lit.progress"]


def test_a_log_gets_a_line_every_tenth_with_rate_and_eta(caplog):
    with caplog.at_level(logging.INFO, logger="retro_lit.progress"):
        for _ in ProgressLog(range(50), desc="embed", unit="chunk", min_seconds=0.0):
            time.sleep(0.002)
    lines = messages(caplog)
    assert [int(re.match(r"embed: (\d+)/50 chunk", line)[1]) for line in lines] == list(range(5, 51, 5))
    assert re.fullmatch(r"embed: 5/50 chunk \(10%\), [\d.]+k? chunk/s, 00:00 elapsed, ETA 00:0\d", lines[0])
    assert "(100%)" in lines[-1] and "ETA" not in lines[-1]  # the last line: the total time


def test_a_stage_of_under_a_second_logs_only_its_last_line(caplog):
    stream = io.StringIO()  # a log file: not a terminal
    with caplog.at_level(logging.INFO, logger="retro_lit.progress"):
        for _ in progress(range(50), desc="embed", unit="chunk", stream=stream):
            time.sleep(0.002)
    (last,) = messages(caplog)
    assert re.fullmatch(r"embed: 50/50 chunk \(100%\), [\d.]+k? chunk/s, 00:00 elapsed", last)
    assert stream.getvalue() == ""  # no bar drawn into the log


def test_slow_work_gets_a_line_every_few_seconds_even_below_a_tenth(caplog):
    with caplog.at_level(logging.INFO, logger="retro_lit.progress"):
        bar = ProgressLog(total=10_000, desc="train", unit="step", every_seconds=0.05, min_seconds=0.0)
        bar.set_postfix_str("train/loss=2.31")
        bar.update()
        time.sleep(0.06)
        bar.update()  # 0.02 % done, but the interval has passed
        bar.update()
        bar.close()
        bar.close()
    (line, last) = messages(caplog)
    assert re.fullmatch(r"train: 2/10000 step \(0%\), [\d.]+ step/s, 00:00 elapsed, ETA \d+:\d\d, train/loss=2.31",
                        line)
    assert last.startswith("train: 3/10000")  # close() says where it stopped, once


def test_unknown_total_logs_counts_without_eta(caplog):
    with caplog.at_level(logging.INFO, logger="retro_lit.progress"):
        for _ in progress(iter(range(3)), desc="scan", unit="doc", stream=io.StringIO()):
            pass
    assert [line.split(",")[0] for line in messages(caplog)] == ["scan: 3 doc"]


def test_a_terminal_gets_a_tqdm_bar(caplog):
    terminal = Terminal()
    with caplog.at_level(logging.INFO, logger="retro_lit.progress"):
        for _ in progress(range(5), desc="embed", unit="chunk", stream=terminal):
            pass
    assert "embed: 100%" in terminal.getvalue() and "5/5" in terminal.getvalue()
    assert messages(caplog) == []


def test_the_last_line_waits_for_close_and_shows_the_metrics_set_after_the_last_batch(caplog):
    with caplog.at_level(logging.INFO, logger="retro_lit.progress"):
        bar = ProgressLog(total=2, desc="validate", unit="batch", min_seconds=0.0)
        bar.update(1)  # 50 %: logged at once
        bar.update(1)  # the last batch: its line waits for the metrics
        bar.set_postfix_str("val/loss=1.5")  # what the end of validation computes afterwards
        bar.close()
        bar.close()
    assert [line.endswith("val/loss=1.5") for line in messages(caplog)] == [False, True]
    assert "2/2 batch (100%)" in messages(caplog)[1]
