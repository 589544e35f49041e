"""Deployment tooling: SageMaker (boto3, with autoscaling), Inference Endpoints, ahead-of-time
Neuron export, endpoint clients, and a local stand-in of the SageMaker runtime front end."""
