#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# dom0 side of tests/tests/xen_lab_protocol.rs: the vbd shapes and toolstack operations a Xen host meets on day
# one, against `blkbackd xen` (the host service) and real Linux blkfronts.
#
# Runs in the lab's dom0 (`xen-lab exec 'bash /mnt/host/bin/protocol-run.sh'`) and prints
#   proto-check: KEY k=v ...   one line per dom0 observation (parsed by the Rust test)
#   proto-guest: NAME LINE     every PROTO-CHECK line of guest NAME's console (its /init: protocol-init)
#   proto-note: ...            progress, for the human reading a failure
# It asserts nothing itself; the Rust test judges the lines.
#
# Phases (PHASES, default: all of them, in this order):
#   grants   the supervisor's budget of grant pages per worker on real gntdev (xen_grant_budget: dom0 grants
#            pages to itself, a forked child plays the worker): whole registrations are charged, a worker at its
#            budget is refused (ENOSPC), and gets room back once it unmaps a registration entirely
#   script   the hotplug script alone (hotplug-script-run.sh): stale error node, second add, sharing refused,
#            same VM allowed, read-only file refused, loop device detached when blkbackd never opens it, remove
#            leaving a loop device that now backs another attach
#   shape    2 vCPUs, blkfront asked for 2 queues and 16-page rings: the negotiated nodes, the guest's queues,
#            fio verify at 4 KiB on both queues, at 1 MiB (128 KiB requests: blkfront's default 32 indirect
#            segments), with fsync=1, and discard; the worker's per-operation counters
#   big      blkfront asked for 256 indirect segments: fio verify at 1 MiB, one blkif request each
#   hotplug  `xl block-attach` of an image (script=block-blkbackd: a delete-on-close loop device) to a running
#            guest, verify, `xl block-detach` while idle; again, detach during I/O. After each: the vbd gone,
#            no loop device left, no gntdev mapping left in the guest's worker
#   save     a verify job; `xl save` during it, `xl restore`: the job goes on and passes
#   migrate  a verify job; `xl migrate` to this host during it: the job goes on and passes
#   partition  a partition of a loop device (`losetup -P`) attached with script=block-blkbackd: pinned by its
#            disk's diskseq (sysfs has none for partitions), served at the partition's size, fio verify passes,
#            to a blkfront without persistent grants
#   lost     a delete-on-close disk (script=block-blkbackd) whose worker is killed after a verify job: the loop
#            device goes with it; the restarted worker cannot reopen it and says why (error node, opened 0, the
#            vbd stays Closed); `xl block-detach` succeeds, `xl block-attach` of the image serves it again
# Knobs (environment): BIN, SVC_USER, PHASES, SAVE_DELAY, MIGRATE_DELAY.
set -u
. /etc/xenlab/common.sh    # OUT, up

BIN=${BIN:-/mnt/host/bin/blkbackd}
SVC_USER=${SVC_USER:-65534:65534}
PHASES=" ${PHASES:-grants script shape big hotplug save migrate partition lost} "
RAMDISK=/mnt/host/bin/proto-domu.cpio.zst
SCRIPT=/mnt/host/bin/block-blkbackd
CTL=/run/blkbackd
SVC_LOG=$OUT/protocol-service.log
export RUST_LOG=${RUST_LOG:-info}
export BLKBACKD=$BIN    # block-blkbackd's remove runs `$BLKBACKD xen --cleanup` for a dead backend

now() { local u _; read -r u _ < /proc/uptime; echo "$u"; }
note() { echo "proto-note: [$(now)] $*"; }
check() { echo "proto-check: $*"; }
# the guest's console; a guest that came in by `xl migrate` goes on in guest-NAME--incoming.log (xenconsoled names
# the log when the domain appears, and the receiving domain is NAME--incoming until it starts)
console() { cat "$OUT/console/guest-$1.log" "$OUT/console/guest-$1--incoming.log" 2>/dev/null | tr -d '\r'; }
# the guest's PROTO-CHECK lines, prefixed for the Rust test
guest_checks() { console "$1" | sed -n "s/^PROTO-CHECK: /proto-guest: $1 /p"; }
# wait_console NAME PATTERN SECONDS: until the guest's console has a line matching PATTERN
wait_console() {
  local i=0
  until console "$1" | grep -q "$2"; do
    i=$((i + 1)); [ $i -ge $(($3 * 5)) ] && return 1
    # a guest that is gone (a panic, a power-off) will print nothing more
    if [ $((i % 25)) = 0 ] && ! xl domid "$1" >/dev/null 2>&1; then console "$1" | grep -q "$2"; return; fi
    sleep 0.2
  done
}
# wait_gone NAME SECONDS: until the domain is gone (else destroy it and say so)
wait_gone() {
  local i=0
  while xl domid "$1" >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -ge $(($2 * 5)) ]; then xl destroy "$1"; check "hung name=$1"; return 1; fi
    sleep 0.2
  done
}
# mkcfg NAME VCPUS "DISKS" "EXTRA kernel args" [MEMORY MiB]
mkcfg() {
  cat > /tmp/$1.cfg <<EOC
name="$1"
type="pv"
kernel="/images/vmlinuz"
ramdisk="$RAMDISK"
extra="console=hvc0 loglevel=4 $4"
memory=${5:-384}
vcpus=$2
disk=[ $3 ]
on_poweroff="destroy"
on_crash="destroy"
EOC
}
create() { xl -vvv create /tmp/$1.cfg > $OUT/xl-$1.log 2>&1; local rc=$?; check "create name=$1 rc=$rc"; return $rc; }
worker_of() { local f; for f in $(grep -l -a "xen-worke[r].*--domid.$1\b" /proc/[0-9]*/cmdline 2>/dev/null); do f=${f#/proc/}; echo "${f%/cmdline}"; return; done; }
gntdev_maps() { [ -n "$1" ] && grep -c /dev/xen/gntdev /proc/$1/maps 2>/dev/null || echo 0; }
loops_of() { /sbin/losetup -a 2>/dev/null | grep -F "$1" | cut -d: -f1 | tr '\n' ' '; }
stats_of() { "$BIN" stats --control "$CTL/dom$1.ctl" --prometheus 2>/dev/null; }
# the sum of counter FAMILY{..op="OP"..} over queues
op_count() { awk -v f="$2" -v op="op=\"$3\"" 'index($1, f "{") == 1 && index($1, op) { s += $2 } END { print s + 0 }' "$1"; }
# the requests answered on queue Q
queue_count() { awk -v q="queue=\"$2\"" 'index($1, "blkbackd_requests_total{") == 1 && index($1, q) { s += $2 } END { print s + 0 }' "$1"; }
# the sum of a counter FAMILY over every label set
family_sum() { awk -v f="$2" 'index($1, f "{") == 1 { s += $2 } END { print s + 0 }' "$1"; }
vbd_states() { local d; for d in $(xenstore-list /local/domain/0/backend/vbd/$1 2>/dev/null); do echo -n "$d:$(xenstore-read /local/domain/0/backend/vbd/$1/$d/state 2>/dev/null) "; done; }

[ -x "$BIN" ] || { echo "proto-error: $BIN missing"; exit 2; }
if [[ $PHASES == *" grants "* ]]; then /mnt/host/bin/xen_grant_budget; fi
# The hotplug script on hand-written vbds, before the service starts (it would serve them).
if [[ $PHASES == *" script "* ]]; then SCRIPT=$SCRIPT bash /mnt/host/bin/hotplug-script-run.sh; fi
note "dom0 $(uname -r); phases:$PHASES"
mkdir -p $CTL
: > "$SVC_LOG"
( cd /tmp && exec setsid "$BIN" xen --user "$SVC_USER" --control-dir $CTL ) >> "$SVC_LOG" 2>&1 &
SVC=$!
trap 'kill -KILL $SVC 2>/dev/null' EXIT
sleep 2
kill -0 $SVC 2>/dev/null || { echo "proto-error: the service exited at once"; tail -20 "$SVC_LOG"; exit 2; }

# ------------------------------------------------------------------------------------------------ shape
if [[ $PHASES == *" shape "* ]]; then
  truncate -s 128M /tmp/shape.img
  L=$(/sbin/losetup -f --show /tmp/shape.img)
  # (blkfront's default 32 indirect segments: with persistent grants it preallocates every segment's page for
  # every slot, and 256 segments x 512 slots x 2 rings would not fit in the guest)
  mkcfg pshape 2 "'format=raw, vdev=xvdb, access=rw, script=block-userspace, target=$L'" \
    "xenlab.proto=shape xen_blkfront.max_ring_page_order=4 xen_blkfront.max_queues=2"
  create pshape
  D=$(xl domid pshape 2>/dev/null)
  FE=/local/domain/$D/device/vbd/51728
  BE=/local/domain/0/backend/vbd/$D/51728
  wait_state $BE/state 4 60
  check "negotiated ring_page_order=$(xenstore-read $FE/ring-page-order 2>/dev/null) queues=$(xenstore-read $FE/multi-queue-num-queues 2>/dev/null) max_ring_page_order=$(xenstore-read $BE/max-ring-page-order 2>/dev/null) max_queues=$(xenstore-read $BE/multi-queue-max-queues 2>/dev/null) indirect=$(xenstore-read $BE/feature-max-indirect-segments 2>/dev/null) discard=$(xenstore-read $BE/feature-discard 2>/dev/null) flush=$(xenstore-read $BE/feature-flush-cache 2>/dev/null) persistent=$(xenstore-read $FE/feature-persistent 2>/dev/null)"
  # the worker's counters once the guest ran its last step (it waits a few seconds before powering off)
  wait_console pshape 'PROTO-CHECK: discard' 420
  stats_of $D > /tmp/shape.stats
  wait_gone pshape 120
  guest_checks pshape
  S=/tmp/shape.stats
  check "ops flush=$(op_count $S blkbackd_requests_total flush) discard=$(op_count $S blkbackd_requests_total discard) read=$(op_count $S blkbackd_requests_total read) write=$(op_count $S blkbackd_requests_total write) io_errors=$(family_sum $S blkbackd_io_errors_total) unsupported=$(family_sum $S blkbackd_unsupported_requests_total) invalid=$(family_sum $S blkbackd_invalid_requests_total) queue0=$(queue_count $S 0) queue1=$(queue_count $S 1)"
  grep -E '^blkbackd_requests_total' $S | head -n 12 | sed 's/^/proto-note: /'
  /sbin/losetup -d $L
  rm -f /tmp/shape.img
fi

# ------------------------------------------------------------------------------------------------ big
# 1 MiB requests: blkfront asked for 256 indirect segments (one ring page, one queue: its preallocation fits)
if [[ $PHASES == *" big "* ]]; then
  truncate -s 64M /tmp/big.img
  L=$(/sbin/losetup -f --show /tmp/big.img)
  mkcfg pbig 1 "'format=raw, vdev=xvdb, access=rw, script=block-userspace, target=$L'" \
    "xenlab.proto=big xen_blkfront.max_indirect_segments=256"
  create pbig
  D=$(xl domid pbig 2>/dev/null)
  wait_console pbig 'PROTO-CHECK: fio' 300
  stats_of $D > /tmp/big.stats
  wait_gone pbig 120
  guest_checks pbig
  check "big-ops writes=$(op_count /tmp/big.stats blkbackd_requests_total write) written_bytes=$(family_sum /tmp/big.stats blkbackd_written_bytes_total) io_errors=$(family_sum /tmp/big.stats blkbackd_io_errors_total) invalid=$(family_sum /tmp/big.stats blkbackd_invalid_requests_total)"
  /sbin/losetup -d $L
  rm -f /tmp/big.img
fi

# ------------------------------------------------------------------------------------------------ hotplug
if [[ $PHASES == *" hotplug "* ]]; then
  truncate -s 64M /tmp/hp1.img; truncate -s 64M /tmp/hp2.img
  # Several detaches during I/O, each at another moment of the job: a detach races with the guest's I/O, and a
  # request that blkfront held back while closing once hung the guest's xenwatch (about one run in ten).
  ROUNDS=${HOTPLUG_BUSY_ROUNDS:-3}
  check "busy-rounds n=$ROUNDS"
  mkcfg photplug 1 "" "xenlab.proto=hotplug xenlab.busy_rounds=$ROUNDS"
  create photplug
  D=$(xl domid photplug 2>/dev/null)
  wait_console photplug PROTO-UP 60
  xl block-attach photplug "format=raw, vdev=xvdc, access=rw, script=$SCRIPT, target=/tmp/hp1.img"; rc=$?
  check "block-attach dev=xvdc rc=$rc loops=[$(loops_of /tmp/hp1.img)]"
  wait_console photplug 'fio job=hp1' 120
  W=$(worker_of $D)
  t0=$(now); xl block-detach photplug xvdc; rc=$?
  check "block-detach dev=xvdc busy=0 rc=$rc secs=$(awk -v a=$t0 -v b=$(now) 'BEGIN{printf "%.1f", b-a}')"
  sleep 1
  check "after-detach dev=xvdc vbds=[$(vbd_states $D)] loops=[$(loops_of /tmp/hp1.img)] worker=${W:-none} gntdev_maps=$(gntdev_maps $W)"
  for i in $(seq 1 "$ROUNDS"); do
    xl block-attach photplug "format=raw, vdev=xvdd, access=rw, script=$SCRIPT, target=/tmp/hp2.img"; rc=$?
    check "block-attach dev=xvdd round=$i rc=$rc loops=[$(loops_of /tmp/hp2.img)]"
    wait_console photplug "busy-start dev=xvdd round=$i " 120 || { check "busy-missing round=$i"; break; }
    # 5, 3, 6, 4, 2 s into the job
    sleep $((2 + (i * 3) % 5))
    W=$(worker_of $D)
    t0=$(now); xl block-detach photplug xvdd; rc=$?
    check "block-detach dev=xvdd round=$i busy=1 rc=$rc secs=$(awk -v a=$t0 -v b=$(now) 'BEGIN{printf "%.1f", b-a}')"
    sleep 1
    check "after-detach dev=xvdd round=$i vbds=[$(vbd_states $D)] loops=[$(loops_of /tmp/hp2.img)] worker=${W:-none} gntdev_maps=$(gntdev_maps $W)"
    # the next attach once the guest saw this disk go (it waits for the node to reappear)
    wait_console photplug "detached dev=xvdd round=$i " 60 || { check "detach-unseen round=$i"; break; }
  done
  wait_gone photplug 180 && check "gone name=photplug"
  guest_checks photplug
  rm -f /tmp/hp1.img /tmp/hp2.img
fi
# ------------------------------------------------------------------------------------------------ save
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
worker_alive() { [ -n "${1:-}" ] && [ -d "/proc/$1" ] && echo 1 || echo 0; }
if [[ $PHASES == *" save "* ]]; then
  # (dom0's /tmp: a tmpfs of half of dom0's memory, which the Rust test raises to 1.5 GiB for this; the 9p
  # share refuses the checkpoint's writes of foreign pages with EFAULT)
  CHK=/tmp/psave.chk
  truncate -s 64M /tmp/save.img
  mkcfg psave 1 "'format=raw, vdev=xvdb, access=rw, script=$SCRIPT, target=/tmp/save.img'" "xenlab.proto=verify xenlab.vsize=${SAVE_VSIZE:-16M}"
  create psave
  D=$(xl domid psave 2>/dev/null)
  wait_console psave 'PROTO-CHECK: device' 120
  sleep "${SAVE_DELAY:-5}"
  W=$(worker_of $D)
  check "before-save domid=$D loops=[$(loops_of /tmp/save.img)] worker=${W:-none}"
  t0=$(now); timeout 300 xl save psave $CHK > $OUT/xl-save.log 2>&1; rc=$?
  check "save rc=$rc secs=$(secs_since $t0)"
  sleep 1
  check "after-save vbds=[$(vbd_states $D)] loops=[$(loops_of /tmp/save.img)] worker_alive=$(worker_alive $W)"
  t0=$(now); [ -s $CHK ] && timeout 300 xl restore $CHK > $OUT/xl-restore.log 2>&1; rc=$?
  D2=$(xl domid psave 2>/dev/null)
  check "restore rc=$rc secs=$(secs_since $t0) domid=${D2:-none} loops=[$(loops_of /tmp/save.img)]"
  wait_gone psave 240 && check "gone name=psave"
  sleep 1
  check "after-psave loops=[$(loops_of /tmp/save.img)] vbds=[$(vbd_states ${D2:-x})]"
  guest_checks psave
  rm -f $CHK /tmp/save.img
fi

# ------------------------------------------------------------------------------------------------ migrate
if [[ $PHASES == *" migrate "* ]]; then
  truncate -s 64M /tmp/mig.img
  mkcfg pmig 1 "'format=raw, vdev=xvdb, access=rw, script=$SCRIPT, target=/tmp/mig.img'" "xenlab.proto=verify xenlab.vsize=${MIGRATE_VSIZE:-48M}"
  create pmig
  D=$(xl domid pmig 2>/dev/null)
  wait_console pmig 'PROTO-CHECK: device' 120
  sleep "${MIGRATE_DELAY:-5}"
  W=$(worker_of $D)
  check "before-migrate domid=$D loops=[$(loops_of /tmp/mig.img)] worker=${W:-none}"
  # the handover: sample the image's loop devices while both domains exist
  ( for _ in $(seq 1 600); do
      n=$(xl list 2>/dev/null | grep -c '^pmig')
      [ "$n" -ge 2 ] && echo "both $(loops_of /tmp/mig.img)"
      sleep 0.2
    done > /tmp/mig.samples ) &
  SAMPLER=$!
  # `-s ''`: run the receiver as given, here on this host (no ssh)
  t0=$(now); timeout 300 xl migrate -s '' pmig 'xl migrate-receive' > $OUT/xl-migrate.log 2>&1; rc=$?
  kill $SAMPLER 2>/dev/null; wait $SAMPLER 2>/dev/null
  D2=$(xl domid pmig 2>/dev/null)
  # whether the guest's verify job was still running when the migration was over (it must span the handover)
  job_done=$(console pmig | grep -c 'PROTO-CHECK: fio job=long')
  # Xen 4.17 as the lab runs it (Debian's build, in QEMU TCG) cannot put a PV guest in log-dirty mode
  unsupported=$(grep -c 'Failed to enable logdirty' $OUT/xl-migrate.log)
  check "migrate rc=$rc logdirty_unsupported=$unsupported secs=$(secs_since $t0) job_done=$job_done domid=${D2:-none} loops=[$(loops_of /tmp/mig.img)] both_seen=$(grep -c ^both /tmp/mig.samples) both_loops=[$(grep ^both /tmp/mig.samples | tail -n1 | cut -d' ' -f2- )] old_worker_alive=$(worker_alive $W) old_vbds=[$(vbd_states $D)]"
  wait_gone pmig 240 && check "gone name=pmig"
  sleep 1
  check "after-pmig loops=[$(loops_of /tmp/mig.img)] vbds=[$(vbd_states ${D2:-x})]"
  guest_checks pmig
  rm -f /tmp/mig.img
fi
# ------------------------------------------------------------------------------------------------ partition
# mbr_one_partition FILE START SECTORS: an MBR partition table with one Linux partition (no tool in dom0 writes one)
mbr_one_partition() {
  # le N: N as 4 little-endian bytes, written as printf escapes
  le() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
  # entry 1 at byte 446: not bootable, CHS unused (0xfe 0xff 0xff), type 0x83, LBA start, sector count
  printf "\\x00\\xfe\\xff\\xff\\x83\\xfe\\xff\\xff$(le $2)$(le $3)" | dd of="$1" bs=1 seek=446 conv=notrunc 2>/dev/null
  printf '\x55\xaa' | dd of="$1" bs=1 seek=510 conv=notrunc 2>/dev/null
}
if [[ $PHASES == *" partition "* ]]; then
  truncate -s 64M /tmp/part.img
  mbr_one_partition /tmp/part.img 2048 65536
  PL=$(/sbin/losetup -f --show -P /tmp/part.img)
  P=${PL}p1
  wait_dev() { local i=0; while [ ! -b "$1" ]; do i=$((i + 1)); [ $i -ge 50 ] && return 1; sleep 0.2; done; }
  wait_dev $P || note "no $P after losetup -P"
  PN=${P#/dev/}
  # Without persistent grants (as BSD and older Windows frontends): every request's grants are mapped through the
  # supervisor and its I/O goes through bounce pages.
  mkcfg ppart 1 "'format=raw, vdev=xvdb, access=rw, script=$SCRIPT, target=$P'" \
    "xenlab.proto=verify xenlab.vsize=8M xen_blkfront.feature_persistent=0"
  create ppart
  D=$(xl domid ppart 2>/dev/null)
  BE=/local/domain/0/backend/vbd/$D/51728
  wait_state $BE/state 4 60
  pdev=$(cat /sys/class/block/$PN/dev 2>/dev/null)
  check "part-connected state=$(xenstore-read $BE/state 2>/dev/null) physical_device=$(xenstore-read $BE/physical-device 2>/dev/null) want_device=$(printf '%x:%x' ${pdev%:*} ${pdev#*:}) diskseq=$(xenstore-read $BE/diskseq 2>/dev/null) disk_diskseq=$(printf '%x' $(cat /sys/block/${PL#/dev/}/diskseq)) opened=$(xenstore-read $BE/opened 2>/dev/null) sectors=$(xenstore-read $BE/sectors 2>/dev/null) part_sectors=$(cat /sys/class/block/$PN/size) front_persistent=$(xenstore-read /local/domain/$D/device/vbd/51728/feature-persistent 2>/dev/null)"
  wait_gone ppart 180 && check "gone name=ppart"
  guest_checks ppart
  /sbin/losetup -d $PL
  rm -f /tmp/part.img
fi

# ------------------------------------------------------------------------------------------------ lost
if [[ $PHASES == *" lost "* ]]; then
  truncate -s 64M /tmp/lost.img
  mkcfg plost 1 "'format=raw, vdev=xvdb, access=rw, script=$SCRIPT, target=/tmp/lost.img'" "xenlab.proto=lost"
  create plost
  D=$(xl domid plost 2>/dev/null)
  BE=/local/domain/0/backend/vbd/$D/51728
  ERR=/local/domain/0/error/backend/vbd/$D/51728/error
  wait_console plost 'fio job=lost1' 180
  W=$(worker_of $D)
  check "lost-before-kill loops=[$(loops_of /tmp/lost.img)] opened=$(xenstore-read $BE/opened 2>/dev/null) worker=${W:-none}"
  [ -n "$W" ] && kill -KILL "$W"
  t0=$(now); explained=0
  while [ "$(secs_since $t0 | cut -d. -f1)" -lt 60 ]; do
    xenstore-read $ERR 2>/dev/null | grep -q 'previous backend process held is gone' && { explained=1; break; }
    sleep 0.5
  done
  W2=$(worker_of $D)
  note "error node: $(xenstore-read $ERR 2>/dev/null)"
  check "lost-after-kill explained=$explained secs=$(secs_since $t0) loops=[$(loops_of /tmp/lost.img)] state=$(xenstore-read $BE/state 2>/dev/null) opened=$(xenstore-read $BE/opened 2>/dev/null) new_worker=${W2:-none}"
  wait_console plost 'PROTO-CHECK: lost' 120
  t0=$(now); timeout 120 xl block-detach plost xvdb; rc=$?
  check "lost-detach rc=$rc secs=$(secs_since $t0) vbds=[$(vbd_states $D)] loops=[$(loops_of /tmp/lost.img)]"
  xl block-attach plost "format=raw, vdev=xvdc, access=rw, script=$SCRIPT, target=/tmp/lost.img"; rc=$?
  check "lost-attach rc=$rc loops=[$(loops_of /tmp/lost.img)]"
  wait_gone plost 180 && check "gone name=plost"
  sleep 1
  check "after-plost loops=[$(loops_of /tmp/lost.img)] vbds=[$(vbd_states $D)]"
  guest_checks plost
  rm -f /tmp/lost.img
fi
note "done"
kill -TERM $SVC; wait $SVC; check "service exit rc=$?"
echo "proto-service-log:"; grep -E 'WARN|ERROR' "$SVC_LOG" | tail -n 30
