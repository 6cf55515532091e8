#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Resident memory of the `blkbackd xen` service (the supervisor and the guest's worker process) per connected
# vbd, in the real Xen lab's dom0:
#   xen-lab boot --no-blkback && xen-lab wait-dom0 && xen-lab exec 'bash /mnt/host/bin/rss-per-vbd.sh'
# (with blkbackd and this script in $XENLAB_DIR/share/bin). A PV domU starts with one disk (running the lab's
# fio job on it); three more are hot-plugged with `xl block-attach`. /proc/PID/status is sampled 2 s after each
# vbd reached Connected, and once the domU is gone. Prints Markdown table rows, then blkbackd's exit status.
set -u
OUT=${XENLAB_OUT:-/mnt/host/out}
/mnt/host/bin/blkbackd xen --user 65534:65534 > "$OUT/rss-per-vbd-backend.log" 2>&1 &
BE=$!
sleep 1
LOOPS=()
for i in 0 1 2 3; do
  truncate -s 64M "/tmp/rss-d$i.img"
  LOOPS[i]=$(losetup -f --show "/tmp/rss-d$i.img")
done
# The supervisor's children named blkbackd: the guests' workers.
workers() {
  local s
  for s in /proc/[0-9]*/stat; do
    read -r -a f 2>/dev/null <"$s" || continue
    [ "${f[3]}" = "$BE" ] && [ "${f[1]}" = "(blkbackd)" ] && echo "${f[0]}"
  done
}
sample() {
  local p role
  for p in "$BE" $(workers); do
    role=worker
    [ "$p" = "$BE" ] && role=supervisor
    awk -v label="$1" -v role="$role" '
      /^Threads:/ { t = $2 } /^VmRSS:/ { r = $2 } /^RssAnon:/ { a = $2 } /^RssFile:/ { f = $2 } /^RssShmem:/ { s = $2 }
      END { printf "| %s | %s | %s | %s | %s | %s | %s |\n", label, role, t, r, a, f, s }' "/proc/$p/status"
  done
}
connected() {
  local want=$1 n=0
  for _ in $(seq 1 120); do
    n=$(xenstore-ls -f /local/domain/0/backend/vbd 2>/dev/null | grep -c '/state = "4"')
    [ "$n" -ge "$want" ] && sleep 2 && return 0
    sleep 0.5
  done
  echo "rss-per-vbd: only $n of $want vbds connected" >&2
  return 1
}
echo "| vbds connected | process | threads | VmRSS KiB | private (anon) KiB | binary (file) KiB | shmem KiB |"
echo "|---|---|---|---|---|---|---|"
sample "0 (started, watching)"
spec() { echo "format=raw, vdev=xvd$1, access=rw, backendtype=phy, script=block-userspace, target=$2"; }
sh /etc/xenlab/domu.sh rss1 "'$(spec b "${LOOPS[0]}")'" "xenlab.runtime=25 xenlab.vsize=0" > "$OUT/rss-per-vbd-domu.log" 2>&1 &
DOMU=$!
connected 1 && sample 1
n=1
for letter in c d e; do
  xl block-attach rss1 "$(spec "$letter" "${LOOPS[n]}")"
  n=$((n + 1))
  connected "$n" && sample "$n"
done
wait "$DOMU"
sleep 3
sample "0 again (domU gone)"
kill -TERM "$BE"
wait "$BE"
status=$?
echo
echo "blkbackd exit status after SIGTERM: $status"
for l in "${LOOPS[@]}"; do losetup -d "$l"; done
rm -f /tmp/rss-d?.img
