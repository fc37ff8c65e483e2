"""POST /explain: one image's answer with a heat map of the evidence for the predicted class (the page's "why?").

The image comes as for /predict (raw body or multipart field 'file') and passes the same checks
(size, pixels from the header before any decode, the request's decode window, the deadline). The
forward pass runs on the inference thread, outside the micro-batches (an explanation needs the
evidence maps, a prediction does not), through ``inference.explain``, torch-free on ONNX Runtime.
The answer is /predict's JSON plus ``evidence`` (the map as shown, [h][w] in 0..1) and ``overlay``
(the picture with the map blended over it, a ``data:image/png;base64`` URL). A model that cannot
draw maps (an ONNX file exported before they existed) answers 501 with the line saying what to do.
"""

from __future__ import annotations

import asyncio
import base64

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ursa.apps.serve.body import image_error, one_image
from ursa.apps.serve.config import ServeConfig
from ursa.apps.serve.limits import DecodeGate, check_image_pixels
from ursa.apps.web import ApiError
from ursa.errors import ImageError, UrsaError
from ursa.inference.explain import Explanation, explain_arrays


async def explain(request: Request) -> Response:
    """One image: the answer, the evidence map and the overlay PNG."""
    state = request.app.state
    config: ServeConfig = state.config
    try:
        data = await one_image(request, config)
        cost = check_image_pixels(data, state.decode_side, config.max_pixels)
        gate = DecodeGate(state.decode_pool.run, state.pixel_budget, config.decode_window)
        try:
            async with asyncio.timeout(config.request_timeout):
                try:
                    x = await gate.decode(state.predictor.preprocess, data, cost)
                except ImageError as e:
                    raise image_error(e) from None
                e, png = await state.batcher.pool.run(one, state.predictor, x)
        except TimeoutError:
            raise ApiError(503, f"the server is busy: this request did not finish within {config.request_timeout:g} s; "
                                "try again later", {"Retry-After": "5"}) from None
    except ApiError as err:
        return err.response()
    except ClientDisconnect:
        return Response(status_code=400)
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return JSONResponse({**e.prediction.to_json(), **e.to_json(), "overlay": url})


def one(pred: object, x: object) -> tuple[Explanation, bytes]:
    """One image's explanation and its overlay PNG, on the inference thread; a model without maps is the server's 501."""
    try:
        e = explain_arrays(pred, [x])[0]
    except UrsaError as err:
        raise ApiError(501, str(err)) from None
    return e, e.png()
