"""Ray Tune sweeps, evaluation gates and the adapter registry (issue #7); imports from jobs/."""
