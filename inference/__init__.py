"""Running a model: loading the base, the runtime (device, precision, ranks), the one greedy
generation, and the hf engine with per-row LoRA. Used by training (evaluation, rollouts), by the
lifecycle (evaluation, the gate) and by serving; it imports only core."""
