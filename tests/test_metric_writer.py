"""The metrics a run writes: JSON lines, and TensorBoard events written in the caller's thread."""

import json
import struct
import threading

from tensorboardX.proto import event_pb2

from hybridhash_jax import metric_writer


def _events(path):
  """The records of a TFRecord file (length, its CRC, data, the data's CRC), as Event protos."""
  data, out, at = path.read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    out.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return out


def test_lines_and_events_hold_every_scalar_and_no_thread_writes_them(tmp_path):
  threads = threading.active_count()
  with metric_writer.MetricWriter(str(tmp_path)) as writer:
    assert threading.active_count() == threads  # a full disk meets the writer, not a thread of its own
    writer.write(1, {"loss": 2.5, "map": 0.25, "curve": [1.0, 2.0]})
    writer.write(2, {"loss": 1.5})
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 2.5, "map": 0.25}, {"step": 2, "loss": 1.5}]
  (events_file,) = (tmp_path / "tensorboard").iterdir()
  events = _events(events_file)
  assert events[0].file_version == "brain.Event:2"
  assert [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value] == [
      (1, "loss", 2.5), (1, "map", 0.25), (2, "loss", 1.5)]
