#!/bin/sh
# Container entrypoint: turns the ways SageMaker, Inference Endpoints and TGI users start an
# image into one `python -m handler serve` process that replaces this shell (exec), so SIGTERM
# from `docker stop` or SageMaker reaches the server and its drain, and its exit status is ours.
#
#   IMAGE                          -> python -m handler serve            (CMD ["serve"])
#   IMAGE serve [--flag VALUE...]  -> python -m handler serve [--flag VALUE...]   (SageMaker)
#   IMAGE --model-id X ...         -> python -m handler serve --model-id X ...    (TGI launcher)
#   IMAGE bash | python ... | ...  -> run as given
#
# PYTHON picks the interpreter (default python3 on PATH); the image puts the code on PYTHONPATH.
set -eu

python_bin="${PYTHON:-python3}"

if [ "$#" -eq 0 ]; then
    set -- serve
fi

case "$1" in
    serve)
        shift
        exec "$python_bin" -m handler serve "$@"
        ;;
    -*)
        exec "$python_bin" -m handler serve "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
