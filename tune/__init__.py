"""The adapter's lifecycle: Ray Tune sweeps, evaluation and the gate, the adapter registry, the
one-command pipeline. Imports jobs/, inference/ and core/ (.importlinter)."""
