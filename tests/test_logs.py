"""metrics.jsonl on resume: records after the checkpoint move aside, nothing is lost."""

import json

from pfc_jax import logs


def _write(path, lines):
    path.write_bytes(b"".join(lines))


def test_records_after_the_resume_step_and_a_cut_line_move_to_superseded(tmp_path):
    rec = [json.dumps({"step": s, "train/loss": float(s)}).encode() + b"\n" for s in (1, 2, 3, 4)]
    ev = json.dumps({"step": 3, "eval/x/accuracy": 0.5}).encode() + b"\n"
    cut = b'{"step": 5, "train/lo'  # a crash while writing
    path = tmp_path / "metrics.jsonl"
    _write(path, [rec[0], rec[1], rec[2], ev, rec[3], cut])
    assert logs.truncate_after(str(path), 3) == 2
    assert path.read_bytes() == rec[0] + rec[1] + rec[2] + ev
    assert (tmp_path / logs.SUPERSEDED).read_bytes() == rec[3] + cut + b"\n"
    assert logs.truncate_after(str(path), 3) == 0  # idempotent
    # No checkpoint to resume from: every record belongs to the discarded start.
    assert logs.truncate_after(str(path), None) == 4
    assert path.read_bytes() == b""
    assert (tmp_path / logs.SUPERSEDED).read_bytes() == rec[3] + cut + b"\n" + rec[0] + rec[1] \
        + rec[2] + ev
    assert logs.truncate_after(str(tmp_path / "missing.jsonl"), 3) == 0


def test_the_logger_truncates_on_open_and_appends_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [json.dumps({"step": s, "train/loss": 1.0}).encode() + b"\n" for s in (1, 2, 3)])
    logger = logs.MetricLogger(str(tmp_path), 10, resume_step=2, stream=open("/dev/null", "w"))
    logger.write(3, {"loss": 2.0}, prefix="train")
    logger.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    losses = [json.loads(line)["train/loss"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3] and losses == [1.0, 1.0, 2.0]
