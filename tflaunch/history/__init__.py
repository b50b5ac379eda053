"""Run history, plain files on a (possibly shared) filesystem: the store and its records, snapshots, outputs, metrics, the model registry, git information, reports."""
