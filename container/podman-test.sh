#!/usr/bin/env bash
# `make image-test`: build the CPU image and run it with podman, on a machine without a Docker
# daemon or a reachable container registry (about 10 minutes on 2 cores; not part of `make test`).
#
#   1. podman: installed with apt-get when missing (as root), else this script skips, saying why.
#   2. This machine's settings, detected, never assumed: the OCI runtime podman can use, the
#      ulimits it may set (podman raises nofile and nproc past a low hard limit, and the container
#      then fails to start), the extra CA certificates the package index is reached through.
#   3. The Dockerfile's FROM image, only when it is missing (--pull=never): a stand-in made with
#      debootstrap (Debian 12 with Debian's python3, its headers and pip, as
#      python:3.11-slim-bookworm is).
#   4. The runtime and test targets, --format docker (an OCI image has no HEALTHCHECK), torch from
#      the PyTorch CPU index when it answers, else from a directory holding the local CPU wheel;
#      the runtime image holds no handler/testing.
#   5. The test suite inside the test image, with --network none.
#   6. The runtime image: `serve` with the model mounted at /opt/ml/model, /ping, /invocations, a
#      stream, the compiled decode step built and running (/info), `podman healthcheck run`, the
#      TGI-launcher form; `podman stop` drains, exits 0.
#
# MODEL_DIR: the model to mount (default: the bundled SmolLM2 model, `python3 -m
# handler.testing.smollm2`). IMAGE_REPO_NAME: the image name (default hf-neuron-serving).
# Its containers are named image-test-<pid>-* and removed on exit, whatever happened.
set -euo pipefail

cd "$(dirname "$0")/.."

IMAGE="${IMAGE_REPO_NAME:-hf-neuron-serving}"
PYTHON="${PYTHON:-python3}"
DOCKERFILE=container/Dockerfile.cpu
TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_PIN=torch==2.13.0
# Inside the build context (.dockerignore keeps it), outside git (.gitignore's .make/).
TORCH_WHEELS=.make/torch-wheels
PREFIX="image-test-$$"
PORT=18080
GRACE=120  # SHUTDOWN_GRACE_SECONDS of the drain check

PODMAN=(podman)  # with --runtime when podman's own choice is missing
LIMITS=()        # --ulimit flags for builds and containers
BASE_CA=()       # this machine's extra CA certificates, for a stand-in base
FAILURES=0

say() { printf 'image-test: %s\n' "$*"; }
pass() { printf 'image-test: PASS %s\n' "$*"; }
fail() {
    printf 'image-test: FAIL %s\n' "$*" >&2
    FAILURES=$((FAILURES + 1))
}

# podman for containers with a health check: without systemd it cannot set the check's timer
# and says so at every start and removal; those lines are left out (the script runs the check).
podman_hc() {
    "${PODMAN[@]}" "$@" 2> >(grep -v 'unable to get systemd connection' >&2)
}

cleanup() {
    local names
    names="$("${PODMAN[@]}" ps --all --format '{{.Names}}' 2>/dev/null \
        | grep "^${PREFIX}-" || true)"
    if [ -n "$names" ]; then
        # shellcheck disable=SC2086 # one container name a line
        podman_hc rm --force --time 5 $names >/dev/null || true
    fi
}
trap cleanup EXIT

# --- 1. podman ---------------------------------------------------------------------------------

ensure_podman() {
    if command -v podman >/dev/null; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "podman not found: installing podman, debootstrap and runc with apt-get"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            podman buildah debootstrap runc ca-certificates curl
        return
    fi
    say "SKIP: podman is not installed, and installing it needs root and apt-get" \
        "(install podman, or run container/build.sh with Docker)"
    exit 0
}

# --- 2. this machine's settings ------------------------------------------------------------------

# A container that runs `true` from `image`, with the flags found so far.
probe() {
    "${PODMAN[@]}" run --rm --network none "${LIMITS[@]}" "$1" true >/dev/null 2>&1
}

detect_runtime() {
    if "${PODMAN[@]}" info --format '{{.Host.OCIRuntime.Name}}' >/dev/null 2>&1; then
        say "OCI runtime: $("${PODMAN[@]}" info --format '{{.Host.OCIRuntime.Path}}')"
        return
    fi
    local runtime
    for runtime in runc crun; do
        if command -v "$runtime" >/dev/null \
            && podman --runtime "$(command -v "$runtime")" info >/dev/null 2>&1; then
            PODMAN=(podman --runtime "$(command -v "$runtime")")
            say "OCI runtime: podman's default is missing, using $(command -v "$runtime")"
            return
        fi
    done
    say "no OCI runtime podman can use: install runc or crun" >&2
    exit 1
}

# Containers start with podman's ulimits unless told otherwise, which a machine whose root lacks
# CAP_SYS_RESOURCE cannot grant (runc: "error setting rlimit ... operation not permitted"). Then
# the largest values that work, from this machine's hard limits down, are passed explicitly.
detect_ulimits() {
    local image="$1" nofile nproc
    if probe "$image"; then
        say "ulimits: podman's defaults work"
        return
    fi
    for nofile in "$(ulimit -Hn)" 65536 20000 4096; do
        for nproc in "$(ulimit -Hu)" 32768 16384 4096; do
            [ "$nofile" = unlimited ] && nofile=1048576
            [ "$nproc" = unlimited ] && nproc=1048576
            LIMITS=(--ulimit "nofile=${nofile}:${nofile}" --ulimit "nproc=${nproc}:${nproc}")
            if probe "$image"; then
                say "ulimits: podman's defaults fail here; using ${LIMITS[*]}"
                return
            fi
        done
    done
    say "a container cannot start here, with podman's ulimits nor with lower ones:" >&2
    LIMITS=()
    "${PODMAN[@]}" run --rm --network none "$image" true >&2 || true
    exit 1
}

# Certificates added to this machine's trust store (a proxy's own CA, say): pip in a build
# container needs them to reach the package index the way this machine does.
detect_ca() {
    local cert
    for cert in /usr/local/share/ca-certificates/*.crt; do
        [ -f "$cert" ] && BASE_CA+=("$cert")
    done
    if [ "${#BASE_CA[@]}" -gt 0 ]; then
        say "CA certificates of this machine, for a stand-in base: ${BASE_CA[*]}"
    fi
}

# --- 3. the FROM image ---------------------------------------------------------------------------

base_image() {
    sed -n 's/^FROM \([^ ]*\) AS base$/\1/p' "$DOCKERFILE"
}

# python:3.11-slim-bookworm as far as the Dockerfile uses it: Debian 12, python and pip in
# /usr/local/bin, Python's headers (inductor compiles against them), pip allowed to install into
# the system (no EXTERNALLY-MANAGED), apt sources.
build_standin_base() {
    local name="$1" root
    command -v debootstrap >/dev/null || {
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
        else
            say "SKIP: $name is missing and debootstrap, which makes a stand-in, is not installed"
            exit 0
        fi
    }
    root="$(mktemp -d /var/tmp/image-test-base.XXXXXX)"
    say "$name is missing: building a stand-in with debootstrap (a few minutes)"
    debootstrap --variant=minbase \
        --include=python3,python3-dev,python3-pip,python3-venv,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 || {
        tail -n 20 "$root.log" >&2
        rm -rf "$root" "$root.log"
        exit 1
    }
    cat >"$root/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
    ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    if [ "${#BASE_CA[@]}" -gt 0 ]; then
        cp "${BASE_CA[@]}" "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "${PODMAN[@]}" import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$name" >/dev/null
    rm -rf "$root" "$root.log"
    say "stand-in $name imported"
}

# --- 4. the images -------------------------------------------------------------------------------

# The torch source: the CPU index when it answers, else a directory with the CPU wheel that pip
# finds on this machine (its find-links or cache), passed as the TORCH_WHEELS build argument.
torch_build_args() {
    if curl --silent --fail --max-time 10 --output /dev/null "$TORCH_INDEX_URL/torch/"; then
        say "torch: from $TORCH_INDEX_URL" >&2
        return
    fi
    if ! ls "$TORCH_WHEELS"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
        rm -rf "$TORCH_WHEELS"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.11 --platform manylinux_2_28_x86_64 \
            --dest "$TORCH_WHEELS" "$TORCH_PIN" >&2
    fi
    local wheel
    wheel="$(ls "$TORCH_WHEELS"/torch-*.whl)"
    case "$wheel" in
        *+cpu-*) ;;
        *)
            say "$TORCH_INDEX_URL does not answer and pip found $wheel, not a CPU build" >&2
            exit 1
            ;;
    esac
    say "torch: $TORCH_INDEX_URL does not answer; from $wheel" >&2
    echo "--build-arg=TORCH_WHEELS=$TORCH_WHEELS"
}

build_images() {
    local target tag started log
    local -a torch_args
    mapfile -t torch_args < <(torch_build_args)
    for target in runtime test; do
        tag="$IMAGE:cpu"
        [ "$target" = runtime ] || tag="$IMAGE:cpu-$target"
        log="/var/tmp/$PREFIX-build-$target.log"
        started="$(date +%s)"
        say "building $tag (target $target)"
        nice -n 10 "${PODMAN[@]}" build --format docker --pull=never --network host \
            "${LIMITS[@]}" "${torch_args[@]}" --file "$DOCKERFILE" --target "$target" \
            --tag "$tag" . >"$log" 2>&1 || {
            tail -n 40 "$log" >&2
            say "build of target $target failed; full log: $log" >&2
            exit 1
        }
        say "built $tag in $(($(date +%s) - started))s," \
            "$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$tag" \
                | awk '{printf "%.2f GB", $1 / 1e9}')"
        rm -f "$log"
    done
}

# What the build made of the Dockerfile: the runtime image keeps its HEALTHCHECK (docker format),
# the test image declares none, and the test image ships the runtime's packages at its versions.
check_images() {
    local health
    health="$("${PODMAN[@]}" image inspect --format '{{.Config.Healthcheck}}' "$IMAGE:cpu")"
    case "$health" in
        *healthcheck*) pass "runtime image has its HEALTHCHECK: $health" ;;
        *) fail "runtime image has no HEALTHCHECK ($health): built without --format docker?" ;;
    esac
    health="$("${PODMAN[@]}" image inspect --format '{{.Config.Healthcheck}}' "$IMAGE:cpu-test")"
    case "$health" in
        *NONE*) pass "test image declares no health check: $health" ;;
        *) fail "test image has a health check: $health" ;;
    esac
    # The test helpers stay out of the serving image (its serving-code stage removes them).
    if "${PODMAN[@]}" run --rm --network none --no-healthcheck "${LIMITS[@]}" "$IMAGE:cpu" \
        sh -c 'test -f handler/server/app.py && test ! -e handler/testing'; then
        pass "the runtime image has the serving code and no handler/testing"
    else
        fail "the runtime image lacks handler/server/app.py or holds handler/testing"
    fi
    local runtime_freeze test_freeze differ
    runtime_freeze="$("${PODMAN[@]}" run --rm --network none --no-healthcheck "${LIMITS[@]}" \
        "$IMAGE:cpu" python -m pip freeze --all | sort)"
    test_freeze="$("${PODMAN[@]}" run --rm --network none "${LIMITS[@]}" "$IMAGE:cpu-test" \
        python -m pip freeze --all | sort)"
    differ="$(comm -23 <(echo "$runtime_freeze") <(echo "$test_freeze"))"
    if [ -z "$differ" ]; then
        pass "the test image has every runtime package at the runtime's version" \
            "($(echo "$runtime_freeze" | wc -l) packages)"
    else
        fail "runtime packages the test image has at another version (or not at all):" \
            "$(echo "$differ" | tr '\n' ' ')"
    fi
}

# --- 5. the suite inside the test image ----------------------------------------------------------

run_suite() {
    local started
    started="$(date +%s)"
    say "the test suite inside $IMAGE:cpu-test (--network none; about 12 minutes on 2 cores)"
    if nice -n 10 "${PODMAN[@]}" run --rm --name "$PREFIX-suite" --network none "${LIMITS[@]}" \
        "$IMAGE:cpu-test" python -m pytest -q -p no:cacheprovider 2>&1 | tail -n 25; then
        pass "the test suite inside the test image ($(($(date +%s) - started))s)"
    else
        fail "the test suite inside the test image"
    fi
}

# --- 6. the runtime image ------------------------------------------------------------------------

# Wait until GET $1 answers 200 (or the container $2 stops), at most $3 seconds.
wait_ready() {
    local url="$1" container="$2" deadline=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" = 200 ]; then
            return 0
        fi
        if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$container")" != true ]; then
            "${PODMAN[@]}" logs --tail 20 "$container" >&2
            return 1
        fi
        sleep 1
    done
    "${PODMAN[@]}" logs --tail 20 "$container" >&2
    return 1
}

smoke_test() {
    local model="$1" name="$PREFIX-serve" url="http://127.0.0.1:$PORT" started answer status
    say "serving $model at /opt/ml/model (read-only) as the image's user"
    started="$(date +%s)"
    podman_hc run --detach --name "$name" "${LIMITS[@]}" --publish "127.0.0.1:$PORT:8080" \
        --volume "$model:/opt/ml/model:ro" --env MAX_BATCH_SIZE=2 \
        --env SHUTDOWN_GRACE_SECONDS="$GRACE" "$IMAGE:cpu" serve >/dev/null
    if wait_ready "$url/ping" "$name" 300; then
        pass "serve with the model at /opt/ml/model: /ping 200 after $(($(date +%s) - started))s"
    else
        fail "serve with the model at /opt/ml/model: /ping never answered 200"
        return
    fi
    answer="$(curl -s "$url/invocations" -H 'Content-Type: application/json' \
        -d '{"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 16}}')"
    case "$answer" in
        '[{"generated_text":'*) pass "/invocations: ${answer:0:100}" ;;
        *) fail "/invocations: $answer" ;;
    esac
    answer="$(curl -s "$url/info")"
    case "$answer" in
        *'"compiled_step":"inductor (AOT)"'*) pass "the compiled decode step was built and runs" ;;
        *) fail "the compiled decode step does not run: /info says $answer" ;;
    esac
    answer="$(curl -sN "$url/generate_stream" -H 'Content-Type: application/json' \
        -d '{"inputs": "Hello!", "parameters": {"max_new_tokens": 8}}')"
    if [ "$(grep -c '^data:' <<<"$answer")" -ge 2 ] \
        && grep -q '"generated_text":"' <<<"$answer"; then
        pass "/generate_stream: $(grep -c '^data:' <<<"$answer") events"
    else
        fail "/generate_stream: $answer"
    fi
    # Without systemd nothing runs the health check on its timer: the status stays "starting".
    say "health status before a check is run: $("${PODMAN[@]}" inspect \
        --format '{{.State.Health.Status}}' "$name")"
    if "${PODMAN[@]}" healthcheck run "$name"; then
        pass "podman healthcheck run: healthy"
    else
        fail "podman healthcheck run: unhealthy"
    fi
    answer="$("${PODMAN[@]}" exec "$name" id -u)"
    if [ "$answer" = 1000 ]; then
        pass "the server runs as uid 1000"
    else
        fail "the server runs as uid $answer"
    fi
    # A stream that has begun when `podman stop` sends SIGTERM runs to its end, within the grace
    # (long: a loaded machine here took 7 s a token); the server then exits 0.
    local stream="/var/tmp/$PREFIX-drain.txt" request waited=0
    curl -sN "$url/generate_stream" -H 'Content-Type: application/json' \
        -d '{"inputs": "Tell me a long story.", "parameters": {"max_new_tokens": 12}}' \
        >"$stream" &
    request=$!
    while ! grep -q '"token"' "$stream" && [ "$waited" -lt 300 ]; do
        sleep 0.2
        waited=$((waited + 1))
    done
    podman_hc stop --time $((GRACE + 30)) "$name" >/dev/null
    status="$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$name")"
    wait "$request" || true
    answer="$(grep '^data:' "$stream" | tail -n 1)"
    if [ "$status" = 0 ] && grep -q '"generated_text":"' <<<"$answer" \
        && ! grep -q '"error"' "$stream"; then
        pass "podman stop: the stream in flight ran to its end" \
            "($(grep -c '^data:' "$stream") events), exit status 0"
    else
        fail "podman stop: exit status $status, the stream in flight ended with: $answer"
    fi
    rm -f "$stream"
    podman_hc rm "$name" >/dev/null

    # TGI's launcher form (flags, no `serve`), the port from SAGEMAKER_BIND_TO_PORT.
    name="$PREFIX-tgi"
    podman_hc run --detach --name "$name" "${LIMITS[@]}" --publish "127.0.0.1:$PORT:9090" \
        --volume "$model:/models/smollm2:ro" --env SAGEMAKER_BIND_TO_PORT=9090 "$IMAGE:cpu" \
        --model-id /models/smollm2 --max-batch-size 2 >/dev/null
    if wait_ready "$url/health" "$name" 300; then
        answer="$(curl -s "$url/info")"
        case "$answer" in
            *'"max_batch_size":2,'*) pass "TGI-launcher form on SAGEMAKER_BIND_TO_PORT=9090" ;;
            *) fail "TGI-launcher form: /info says $answer" ;;
        esac
    else
        fail "TGI-launcher form: /health never answered 200"
    fi
    podman_hc stop --time 30 "$name" >/dev/null
    status="$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$name")"
    if [ "$status" = 0 ]; then
        pass "podman stop (TGI-launcher form): exit status 0"
    else
        fail "podman stop (TGI-launcher form): exit status $status"
    fi
    podman_hc rm "$name" >/dev/null
}

# --- main ----------------------------------------------------------------------------------------

main() {
    local started base model
    started="$(date +%s)"
    ensure_podman
    detect_runtime
    detect_ca
    base="$(base_image)"
    if ! "${PODMAN[@]}" image exists "$base"; then
        build_standin_base "$base"
    fi
    detect_ulimits "$base"
    model="${MODEL_DIR:-$("$PYTHON" -m handler.testing.smollm2)}"
    build_images
    check_images
    smoke_test "$model"
    run_suite
    cleanup
    if [ -n "$("${PODMAN[@]}" ps --all --format '{{.Names}}' | grep "^${PREFIX}-" || true)" ]; then
        fail "containers left behind"
    else
        pass "no container left behind"
    fi
    if [ "$FAILURES" -gt 0 ]; then
        say "$FAILURES check(s) failed ($(($(date +%s) - started))s)"
        exit 1
    fi
    say "all checks passed ($(($(date +%s) - started))s)"
}

main "$@"
