#!/usr/bin/env bash
# Builds the icp-gate container image with Debian's buildah, from scratch: no base image is
# pulled from any registry. The image holds the binary (allowed to bind ports below 1024 as a
# plain user), the shared libraries `ldd` names and the dynamic loader, the production config,
# a non-root user (65532) and its state folder; no shell, no package manager, nothing else.
#
#   cargo build --release --locked
#   deploy/container/build.sh [BINARY [IMAGE]]     # as root, or under `buildah unshare`
#
# BINARY defaults to target/release/icp-gate, IMAGE to localhost/icp-gate:VERSION. Run it,
# push it, export it: docs/operations.md#container-image.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
binary=${1:-$repo/target/release/icp-gate}
[[ -x $binary ]] || { echo "build.sh: no executable $binary (cargo build --release first)" >&2; exit 1; }
# "icp-gate 0.1.0 (commit 0123456789ab)"
read -r _ version _ commit < <("$binary" --version)
commit=${commit%)}
image=${2:-localhost/icp-gate:$version}
uid=65532

ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root=$(buildah mount "$ctr")

# The program, and what the dynamic loader needs to start it, at the paths ldd names.
install -D -m 0755 "$binary" "$root/usr/local/bin/icp-gate"
while read -r lib; do
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done < <(ldd "$binary" | grep -o '/[^ ]*')
# Ports 80 and 443 without running as root: the capability is the file's (as with
# ingress-nginx), granted at exec if the runtime leaves it in the bounding set (podman's and
# Docker's defaults do) and privilege escalation is allowed.
setcap cap_net_bind_service=+ep "$root/usr/local/bin/icp-gate"

# The user, with no shell to log in to, and the folders it uses.
install -d -m 0755 "$root/etc" "$root/etc/icp-gate"
printf 'icp-gate:x:%d:%d:icp-gate:/var/lib/icp-gate:/nonexistent\n' "$uid" "$uid" >"$root/etc/passwd"
printf 'icp-gate:x:%d:\n' "$uid" >"$root/etc/group"
# The production config: mount your own (and the admin token it names) over /etc/icp-gate.
install -m 0644 "$repo/deploy/icp-gate.toml" "$root/etc/icp-gate/icp-gate.toml"
install -d -m 0750 -o "$uid" -g "$uid" "$root/var/lib/icp-gate"
install -d -m 1777 "$root/tmp"

buildah umount "$ctr" >/dev/null
buildah config \
    --user "$uid:$uid" \
    --workingdir /var/lib/icp-gate \
    --entrypoint '["/usr/local/bin/icp-gate"]' \
    --cmd '["run", "--config", "/etc/icp-gate/icp-gate.toml", "--log-format", "json"]' \
    --env RUST_LOG=info \
    --port 80/tcp --port 443/tcp --port 9090/tcp \
    --volume /var/lib/icp-gate \
    --stop-signal SIGTERM \
    --label org.opencontainers.image.title=icp-gate \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$commit" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    "$ctr"
buildah commit --quiet --rm "$ctr" "$image" >/dev/null
trap - EXIT
echo "$image"
