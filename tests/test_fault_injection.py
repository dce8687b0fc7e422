"""The fault-injection script (tests/fault_injection.py), reduced: one SIGKILL each, while the output
is being written, of `data build --overwrite` over a finished build and of `train`; each
outcome must be complete and identical to an uninterrupted run, or refused at the next start (and
then complete with --overwrite / by resuming). The full script kills at random moments, many rounds."""

from fault_injection import main


def test_kill_9_while_writing_loses_nothing(capsys):
    code = main(["--rounds", "1", "--when", "writing", "--commands", "rebuild", "train"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("ok   ") == 2 and out.count("killed while writing") == 2, out
