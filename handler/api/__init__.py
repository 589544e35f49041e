"""Wire formats: TGI, OpenAI and SageMaker requests in, responses and streams out; request
bodies read (`body`) and submitted requests followed to their end (`submission`) the same way
for every entry point. Nothing here imports Flask (tests/test_layers.py)."""
