"""Wire formats: TGI, OpenAI and SageMaker requests in, responses and streams out."""
