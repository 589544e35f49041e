"""The SageMaker inference toolkit and Multi Model Server (MMS) on the same engine as the server.

- `inference`: the toolkit's script functions (`model_fn`, `input_fn`, `predict_fn`,
  `output_fn`), usable with the stock toolkit as `SAGEMAKER_PROGRAM=handler.mms.inference`.
- `handler_service`: the handler service MMS loads in its worker.
- `launcher`: `SERVING_STACK=mms python -m handler serve`, MMS started through the toolkit.

Importing this package loads nothing; the toolkit is imported by the modules that use it.
"""
