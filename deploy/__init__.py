"""Deployment helpers: a local SageMaker runtime stand-in and example endpoint clients."""
