#!/usr/bin/env python3
"""Reads a brigade run's TensorBoard directory with the tensorboard package itself.

    tensorboard_check.py RUN/tensorboard

Prints one JSON line: the files, the file_version of the first event, and every
scalar tag as [[step, value], ...] in the order TensorBoard's EventAccumulator (what
the TensorBoard UI loads) returns them. The record reader checks every CRC. Exit
code 3 when the tensorboard package is missing.
"""
import glob
import json
import sys

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
except ImportError as e:
    print(f"tensorboard missing: {e}")
    sys.exit(3)

directory = sys.argv[1]
files = sorted(glob.glob(directory + "/*tfevents*"))
version = None
raw_events = 0
for f in files:
    for event in LegacyEventFileLoader(f).Load():
        raw_events += 1
        if event.HasField("file_version") and version is None:
            version = event.file_version
acc = EventAccumulator(directory, size_guidance={"scalars": 0})
acc.Reload()
scalars = {tag: [[s.step, s.value] for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
print(json.dumps({"files": len(files), "version": version, "raw_events": raw_events, "scalars": scalars}))
