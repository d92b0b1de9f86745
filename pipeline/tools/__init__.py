"""The tools around the pipeline: benchmarks, the chaos harness, reconcile and its
independent reference, the demo shop, the event generator and process helpers."""
