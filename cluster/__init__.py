"""Cluster launcher, KubeRay manifests and laptop-submit helpers."""
