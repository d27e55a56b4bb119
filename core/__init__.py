"""The words every layer of fleetprobe shares, at the bottom of the import graph.

Durations (:mod:`.durations`), wall-clock times (:mod:`.times`), trace ids
(:mod:`.trace_ids`), the error root (:mod:`.errors`) and the state of a bounded queue
(:mod:`.queues`). Nothing here imports another part of fleetprobe.
"""
