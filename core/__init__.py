"""The bottom layer: config machinery, storage (local and s3://), the CLI convention, Ray start-up,
the registry's names and layout, and the bounds on upstream libraries. It imports no other layer."""
