#!/bin/sh
# Container entrypoint: build the TensorRT engines into the engines volume (a no-op once they
# are up to date), then serve. Any other command is passed to `appliance` as it is:
#   docker run ... appliance:jetson check
#   docker run ... appliance:jetson build-engines --force
set -eu

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    [ "$#" -gt 0 ] && shift
    if [ "${INFERENCE_BACKEND:-auto}" != "onnx" ]; then
        status=0
        appliance build-engines || status=$?
        case "$status" in
            0) ;;
            3)
                # build-engines exit 3: TensorRT or the GPU is not usable in this container.
                if [ "${INFERENCE_BACKEND:-auto}" = "trt" ]; then
                    echo "appliance-entrypoint: INFERENCE_BACKEND=trt but TensorRT is not usable (is the container running with the NVIDIA runtime?)" >&2
                    exit 3
                fi
                echo "appliance-entrypoint: TensorRT not usable here; serving with ONNX Runtime" >&2
                ;;
            *)
                echo "appliance-entrypoint: building the TensorRT engines failed (exit $status)" >&2
                exit "$status"
                ;;
        esac
    fi
    exec appliance serve "$@"
fi

exec appliance "$@"
