"""Pipelines: plain functions over typed configs (prepare, pretrain, train, translate, evaluate, demo)."""
