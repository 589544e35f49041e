#!/usr/bin/env bash
# Build, test and push the serving images: what buildspec.yml (CodeBuild) runs, usable by hand.
#   container/build.sh build   # IMAGE_REPO_NAME:neuron, :cpu and :cpu-test (docker with BuildKit)
#   container/build.sh test    # the test suite inside the CPU test image
#   container/build.sh push    # tag <commit>-<variant> and <IMAGE_TAG>-<variant>, push to ECR
# `push` needs AWS_ACCOUNT_ID, AWS_DEFAULT_REGION, IMAGE_TAG and COMMIT_ID (set in pre_build) and
# a `docker login` to the account's ECR registry.
set -euo pipefail

cd "$(dirname "$0")/.."

# The Dockerfiles use COPY --chmod, which the legacy builder does not know.
export DOCKER_BUILDKIT=1
IMAGE_REPO_NAME="${IMAGE_REPO_NAME:-hf-neuron-serving}"
VARIANTS=(neuron cpu)

build() {
    docker build --file container/Dockerfile.neuron --tag "${IMAGE_REPO_NAME}:neuron" .
    docker build --file container/Dockerfile.cpu --target runtime --tag "${IMAGE_REPO_NAME}:cpu" .
    docker build --file container/Dockerfile.cpu --target test --tag "${IMAGE_REPO_NAME}:cpu-test" .
}

run_tests() {
    docker run --rm "${IMAGE_REPO_NAME}:cpu-test"
}

push() {
    # CodeBuild runs post_build even after a failed build phase: never push untested images.
    if [ "${CODEBUILD_BUILD_SUCCEEDING:-1}" != 1 ]; then
        echo "build.sh push: the build or its tests failed, nothing is pushed" >&2
        exit 1
    fi
    : "${AWS_ACCOUNT_ID:?set AWS_ACCOUNT_ID (the account of the ECR repository)}"
    : "${AWS_DEFAULT_REGION:?set AWS_DEFAULT_REGION (the region of the ECR repository)}"
    : "${IMAGE_TAG:?set IMAGE_TAG (the release version, e.g. 0.1.0)}"
    : "${COMMIT_ID:?set COMMIT_ID (the short commit id)}"
    local repository="${AWS_ACCOUNT_ID}.dkr.ecr.${AWS_DEFAULT_REGION}.amazonaws.com/${IMAGE_REPO_NAME}"
    local variant tag
    for variant in "${VARIANTS[@]}"; do
        for tag in "${COMMIT_ID}-${variant}" "${IMAGE_TAG}-${variant}"; do
            docker tag "${IMAGE_REPO_NAME}:${variant}" "${repository}:${tag}"
            docker push "${repository}:${tag}"
        done
    done
}

case "${1:-}" in
    build) build ;;
    test) run_tests ;;
    push) push ;;
    *)
        echo "usage: $0 build|test|push" >&2
        exit 2
        ;;
esac
