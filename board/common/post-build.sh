#!/usr/bin/env bash
# Buildroot post-build step of every storebox board: writes the image's version into the
# root filesystem, /usr/lib/storebox/image-version, which the box reports to the hub and
# compares update bundles against (docs/OTA.md). post-image.sh signs the bundle with the same
# version.
#
#   BR2_ROOTFS_POST_BUILD_SCRIPT="$(BR2_EXTERNAL_STOREBOX_PATH)/../board/common/post-build.sh"
#
# The version is $STOREBOX_IMAGE_VERSION when set (a release: `STOREBOX_IMAGE_VERSION=1.4.0
# make`), else `git describe --tags --always --dirty` of this repository. 1 to 64 of
# A-Z a-z 0-9 . - + _. Buildroot calls it with TARGET_DIR as $1.
set -euo pipefail

target=${1:?"post-build.sh: run by Buildroot (no TARGET_DIR)"}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

version=${STOREBOX_IMAGE_VERSION:-}
if [[ -z $version ]]; then
    version=$(git -C "$repo" describe --tags --always --dirty 2>/dev/null) || {
        echo "post-build.sh: set STOREBOX_IMAGE_VERSION (no git history in $repo)" >&2
        exit 1
    }
fi
if ((${#version} > 64)) || [[ ! $version =~ ^[A-Za-z0-9.+_-]+$ ]]; then
    echo "post-build.sh: image version '$version': 1 to 64 of A-Z a-z 0-9 . - + _" >&2
    exit 1
fi
install -d -m 0755 "$target/usr/lib/storebox"
printf '%s\n' "$version" >"$target/usr/lib/storebox/image-version"
echo "post-build.sh: image version $version"
