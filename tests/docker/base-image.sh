#!/usr/bin/env bash
# A Debian 12 base image made locally (debootstrap + docker import), for
# machines that cannot pull from public registries.  Built once, then reused
# by tag:  tests/docker/base-image.sh [TAG]   (default fbp-test/debian:bookworm)
#
# Python 3.11 with venv and CA certificates is all the project's Dockerfile
# needs from its base (BASE_IMAGE build argument); the stand-in Kafka, Redis
# and Prometheus images add their Debian packages on top.
set -euo pipefail
tag=${1:-fbp-test/debian:bookworm}
mirror=${FBP_DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$tag" >/dev/null 2>&1; then
  exit 0
fi
root=$(mktemp -d /var/tmp/fbp-debootstrap.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$root" "$mirror"
# Trust the CAs this host added locally too: on networks that inspect TLS,
# pip inside the build must accept the same certificates as pip on the host.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
# Keep the image small: no apt lists, caches or docs.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  -c 'CMD ["/bin/bash"]' - "$tag"
echo "built base image $tag"
