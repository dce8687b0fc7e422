"""metrics.jsonl on resume: the records of steps after the checkpoint are dropped (they are redone),
a torn last line of the killed run with them, and the file is replaced atomically."""

from __future__ import annotations

import json

from mmloom.training.metrics import MetricsWriter, read_metrics
from mmloom.training.run_folder import METRICS


def test_resume_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / METRICS
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
    path.write_text("\n".join(lines) + '\n{"step": 7, "lo')  # killed while writing step 7
    writer = MetricsWriter(tmp_path, enabled=True, resume_step=4, tensorboard=False)
    assert path.read_text() == "".join(line + "\n" for line in lines[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS]  # no temporary file left
    writer.write({"step": 5, "loss": 0.5})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_fresh_run_and_a_disabled_writer_leave_the_file_alone(tmp_path):
    path = tmp_path / METRICS
    path.write_text('{"step": 9}\n')
    MetricsWriter(tmp_path, enabled=False, resume_step=2, tensorboard=False).write({"step": 3})
    assert path.read_text() == '{"step": 9}\n'
    assert read_metrics(tmp_path / "nothing-here") == []
