"""The handler service Multi Model Server loads in its worker process.

`start_model_server(handler_service="handler.mms.handler_service")` writes this module's name
into MMS's configuration; the worker imports it and builds its one class (MMS requires exactly
one class defined here), calls `initialize(context)` once, which loads the model (`model_fn`),
then `handle(data, context)` for each request.
"""

from __future__ import annotations

from sagemaker_inference.default_handler_service import DefaultHandlerService

from handler.mms.inference import ServingTransformer


class HandlerService(DefaultHandlerService):
    """The toolkit's handler service over `handler.mms.inference`."""

    def __init__(self) -> None:
        self.transformer = ServingTransformer()
        super().__init__(transformer=self.transformer)
