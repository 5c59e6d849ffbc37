"""The Ray Serve multi-adapter, OpenAI-compatible app (issue #8); imports from jobs/."""
