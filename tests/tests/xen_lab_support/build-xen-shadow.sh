#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Builds the lab's hypervisor again with shadow paging, for the real-Xen protocol test's `migrate` phase, and
# prints the image's path (a multiboot ELF, as `xen-lab build` unpacks Debian's) on its last line.
#
# Why: Debian builds Xen 4.17 without CONFIG_SHADOW_PAGING (/boot/xen-4.17-amd64.config), and a PV guest can only
# be put in log-dirty mode (the live phase of `xl migrate`) through shadow paging, so with Debian's hypervisor
# `xl migrate` of a PV guest fails at the sender (`Failed to enable logdirty: EOPNOTSUPP`). Under QEMU TCG the lab
# has no HVM guests either. This builds Debian's source of Xen 4.17 with Debian's own configuration plus
# CONFIG_SHADOW_PAGING=y, the hypervisor only (the lab keeps Debian's toolstack, of the same stable branch, whose
# domctl interface does not change within it).
#
#   build-xen-shadow.sh [CACHE_DIR]     # default /var/cache/blkbackd-lab; root (apt-get)
#
# The image is kept in CACHE_DIR (xen-<version>-shadow) and reused. The source version is the installed
# hypervisor's if the mirror has it, else the newest 4.17 source it has (the security archive's pool is not
# always reachable). Needs deb-src entries: when apt has none, it adds /etc/apt/sources.list.d/blkbackd-lab-src.sources
# with the URIs, suites and keyring of the Debian entries apt already has. Exits non-zero, saying why, on any failure.
set -euo pipefail

CACHE=${1:-/var/cache/blkbackd-lab}
XENVER=4.17
CONFIG=/boot/xen-$XENVER-amd64.config
SRC_LIST=/etc/apt/sources.list.d/blkbackd-lab-src.sources

say() { echo "build-xen-shadow: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get)"
[ -f "$CONFIG" ] || die "no $CONFIG (run xen-lab setup first)"
mkdir -p "$CACHE"
for f in "$CACHE"/xen-$XENVER.*-shadow; do
  [ -s "$f" ] && { say "cached: $f"; echo "$f"; exit 0; }
done

# source_versions: the 4.17 source versions apt knows, newest first
source_versions() { apt-cache showsrc xen 2>/dev/null | sed -n "s/^Version: \($XENVER\.\)/\1/p" | sort -rV | uniq; }

if [ -z "$(source_versions)" ]; then
  # deb-src entries: the Debian deb822 files apt has, as deb-src, and the one-line Debian entries likewise
  : >"$SRC_LIST.new"
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && [ "$f" != "$SRC_LIST" ] && grep -q '^URIs:.*debian' "$f" || continue
    sed 's/^Types:.*/Types: deb-src/' "$f" >>"$SRC_LIST.new"
    echo >>"$SRC_LIST.new"
  done
  if [ -f /etc/apt/sources.list ] && grep -q '^deb .*debian' /etc/apt/sources.list; then
    grep '^deb .*debian' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"${SRC_LIST%.sources}.list"
  fi
  if [ -s "$SRC_LIST.new" ]; then mv "$SRC_LIST.new" "$SRC_LIST"; else rm -f "$SRC_LIST.new"; fi
  say "added deb-src entries; apt-get update"
  apt-get update -q >&2 || die "apt-get update failed"
fi
[ -n "$(source_versions)" ] || die "apt knows no source of xen $XENVER (no deb-src entry for Debian)"

command -v flex >/dev/null && command -v bison >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends flex bison >&2 ||
  die "cannot install flex and bison (Xen's Kconfig needs them)"
for t in gcc make ld; do command -v $t >/dev/null || die "no $t"; done
PYTHON=$(command -v python3) || die "no python3"
[ -x /usr/bin/python3 ] && PYTHON=/usr/bin/python3

work=$(mktemp -d /var/tmp/build-xen-shadow.XXXXXX)
trap 'rm -rf "$work"' EXIT
installed=$(dpkg-query -W -f='${Version}' xen-hypervisor-$XENVER-amd64 2>/dev/null || true)
version=""
for v in $installed $(source_versions); do
  if (cd "$work" && apt-get source -q --download-only "xen=$v" >&2 2>"$work/apt.err"); then version=$v; break; fi
  say "xen $v: $(tail -n1 "$work/apt.err")"
done
[ -n "$version" ] || die "no source of xen $XENVER could be downloaded"
say "building xen $version with CONFIG_SHADOW_PAGING=y (Debian's configuration otherwise)"
tar -C "$work" -xf "$work"/xen_*.orig.tar.*
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'xen-*' | head -n1)
[ -d "$src/xen" ] || die "no xen/ in the source"
cp "$CONFIG" "$src/xen/.config"
sed -i '/CONFIG_SHADOW_PAGING/d' "$src/xen/.config"
echo CONFIG_SHADOW_PAGING=y >>"$src/xen/.config"
make -C "$src/xen" PYTHON="$PYTHON" olddefconfig >"$work/build.log" 2>&1 || { tail -20 "$work/build.log" >&2; die "olddefconfig failed"; }
grep -q '^CONFIG_SHADOW_PAGING=y' "$src/xen/.config" || die "CONFIG_SHADOW_PAGING did not stay set"
make -C "$src/xen" -j"$(nproc)" PYTHON="$PYTHON" >>"$work/build.log" 2>&1 || { tail -20 "$work/build.log" >&2; die "build failed"; }
out="$CACHE/xen-${version%%[+-]*}-shadow"
cp "$src/xen/xen" "$out.new" && mv "$out.new" "$out"
say "built $out in $SECONDS s"
echo "$out"
