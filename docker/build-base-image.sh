#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim-bookworm, for machines whose
# Docker engine has no image registry to pull from.
#
#   docker/build-base-image.sh [TAG]      (default: stockade/base:bookworm)
#
# mmdebstrap bootstraps a minimal Debian bookworm (merged /usr, no docs, no
# apt lists) with Debian's Python 3.11, venv and pip; `docker import` turns
# the tarball into an image.  Then build the project image with
#   docker build --build-arg BASE_IMAGE=stockade/base:bookworm -f docker/Dockerfile .
#
# The Debian mirror is the one this host's apt already uses, read at run time
# (apt-get indextargets), so no host name is ever written into the
# repository.  Override with STOCKADE_DEBIAN_MIRROR and
# STOCKADE_DEBIAN_SECURITY_MIRROR (full URLs) when the host is not Debian.
# Needs root, mmdebstrap and a Docker engine.  Takes about a minute.
set -euo pipefail

TAG="${1:-stockade/base:bookworm}"
SUITE=bookworm

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-base-image: %s\n' "$*" >&2; exit 1; }

# Repository URIs of the Debian archives this host's apt knows, one per line,
# as "REPO_URI SUITE" (SUITE as written in the sources entry).
host_debian_repos() {
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' \
        'Identifier: Packages' 2>/dev/null | sort -u
}

# The host's main Debian mirror and its security mirror.  Security archives
# are recognised by their suite name (bookworm-security, trixie-security...).
pick_mirrors() {
    local repos
    repos="$(host_debian_repos)"
    MIRROR="${STOCKADE_DEBIAN_MIRROR:-$(awk '$2 !~ /-security$/ && $1 ~ /debian\/?$/ {print $1; exit}' <<<"$repos")}"
    SECURITY="${STOCKADE_DEBIAN_SECURITY_MIRROR:-$(awk '$2 ~ /-security$/ {print $1; exit}' <<<"$repos")}"
    [ -n "$MIRROR" ] || die "no Debian mirror in this host's apt configuration; set STOCKADE_DEBIAN_MIRROR"
}

command -v mmdebstrap >/dev/null || die "mmdebstrap is missing (apt-get install mmdebstrap)"
command -v docker >/dev/null || die "docker is missing"
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap --mode=root)"
pick_mirrors

work="$(mktemp -d)"
# A trap on EXIT removes the rootfs tarball (~200 MB) however the script ends.
trap 'rm -rf "$work"' EXIT
tarball="$work/rootfs.tar"

sources=("deb ${MIRROR%/} $SUITE main" "deb ${MIRROR%/} $SUITE-updates main")
[ -z "$SECURITY" ] || sources+=("deb ${SECURITY%/} $SUITE-security main")

log "bootstrapping Debian $SUITE from the host's mirror"
start=$SECONDS
# --variant=minbase: essential packages + apt, like Docker's debian:*-slim.
# The dpkg path filters keep copyright files but drop docs, man pages and
# translations (what the slim images drop).  The last hooks leave no apt
# lists or caches in the image; `apt-get update` comes first in any build.
mmdebstrap \
    --mode=root \
    --variant=minbase \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=ca-certificates,python3,python3-venv,python3-pip \
    --aptopt='Acquire::Languages "none"' \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    --customize-hook='rm -f "$1"/etc/hostname "$1"/etc/resolv.conf' \
    "$SUITE" "$tarball" "${sources[@]}" >"$work/mmdebstrap.log" 2>&1 \
    || { tail -n 40 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed (log above)"; }

log "importing as $TAG"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "Debian $SUITE minbase + python3 (docker/build-base-image.sh)" \
    "$tarball" "$TAG" >/dev/null
docker run --rm --network none "$TAG" python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version' \
    || die "the imported image has no working Python 3.11"
log "$TAG ready in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%d MB", $1/1e6}'))"
