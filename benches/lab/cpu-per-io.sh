#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Backend CPU per I/O in the real Xen lab: kernel blkback, QEMU qdisk and `blkbackd xen` side by side, in one
# lab boot (with blkbackd and this script in $XENLAB_DIR/share/bin):
#   xen-lab boot --no-blkback && xen-lab wait-dom0 && xen-lab exec 'bash /mnt/host/bin/cpu-per-io.sh'
# For ROUNDS rounds x PEERS x JOBS (kernel blkback's runs first, see the end), a fresh PV domU runs the lab's fio
# perf job (no verify job) on a disk served by the peer (a loop device on a dom0 tmpfs file, as for every peer),
# with the domU kernel arguments xenlab.rw= rwmixread= bs= iodepth= runtime= size= vsize=0 of the lab's domU
# /init (4k: randrw 50/50 4k QD16, the lab's default job; 1m: randrw 50/50 1M QD4). The backend's own CPU time
# (utime+stime of /proc/PID/stat, all threads, exited ones included) is read when the domU's console says
# FIO-START and again when it says FIO-RC (the domU then waits in a shell, `xenlab.shell=1`, so its backend is
# still there; it is destroyed after the reading):
#   kernel    the ring kernel threads "<domid>.<dev>-<ring>" (blkback_name + "%s-%d" in Linux 6.1's
#             xen_update_blkif_status); the I/O completions, which kernel blkback runs in the loop driver's
#             completion context, are not theirs: a lower bound
#   qdisk     the dom0 QEMU serving the guest's qdisk backends (`-xen-domid <domid>` ... `-xen-attach`; libxl
#             starts one per PV guest with a qdisk disk) and a dom0-wide one (`-xen-domid 0`) if there is one
#   blkbackd  every blkbackd process (the service's supervisor and the guest's worker); a peer `blkbackd-X`
#             runs /mnt/host/bin/blkbackd-X the same way (e.g. a build before a change, side by side)
#   raw       no guest and no backend: fio in dom0 on the loop device (io_uring, O_DIRECT, batched), the floor of
#             a userspace backend's I/O path in this dom0 (fio in /mnt/host/bin or on dom0's PATH; see run_raw)
# A pid absent at FIO-START counts from 0. The I/Os are fio's (terse v3 of the console: fields 6 and 47, read
# and write KiB, over the job's block size). Prints one line per run:
#   cpu-per-io: peer=P job=J round=R status=ok read_iops=.. write_iops=.. ios=.. runtime_ms=.. backend_cpu_ms=..
#     us_per_io=.. user_us_per_io=.. dom0_busy_ms=.. dom0_us_per_io=.. switches_per_io=.. tasks=N
# (`blkback-bench lab-cpu-table` turns them into a table). user_us_per_io: the part of us_per_io spent in user
# space (utime; kernel blkback has none). dom0_busy_ms: all of dom0's non-idle CPU time in the same window (loop
# workers, interrupts, xenstored, this script's polling), as context. switches_per_io: the backend's context
# switches per I/O (voluntary and involuntary, of its live threads): how often it slept or was preempted.
# Environment: ROUNDS (2), PEERS ("kernel qdisk blkbackd raw"), JOBS ("4k 1m"), RUNTIME (15 s), SIZE (64M, the fio
# region), DISK_SIZE (128M), BIN (/mnt/host/bin/blkbackd), BLKBACKD_ARGS (more `blkbackd xen` arguments),
# DOMU_EXTRA (more domU kernel arguments, e.g. xen_blkfront.max_indirect_segments=256), STATS (1: save the
# blkbackd worker's counters at FIO-RC to $OUT/cpu-stats-<run>.prom), STRACE (1: `strace -c -f` the blkbackd
# worker during fio, to $OUT/cpu-strace-<run>.txt; changes the CPU figures, diagnosis only), PERF (1: `perf record
# -e cpu-clock -g` the blkbackd worker during fio, the report to $OUT/cpu-perf-<run>.txt; needs a `perf` binary in
# /mnt/host/bin, e.g. the host's; dom0 has no PMU, so software clock samples; diagnosis only).
set -u
. /etc/xenlab/common.sh # OUT, up, mkdomcfg, domid_of

ROUNDS=${ROUNDS:-2}
PEERS=${PEERS:-kernel qdisk blkbackd raw}
JOBS=${JOBS:-4k 1m}
RUNTIME=${RUNTIME:-15}
SIZE=${SIZE:-64M}
DISK_SIZE=${DISK_SIZE:-128M}
BIN=${BIN:-/mnt/host/bin/blkbackd}
BLKBACKD_ARGS=${BLKBACKD_ARGS:-}
DOMU_EXTRA=${DOMU_EXTRA:-}
STATS=${STATS:-1}
STRACE=${STRACE:-0}
PERF=${PERF:-0}
CTL=/run/blkbackd
VDEV=xvdb
USED_LOOPS=""
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)

note() { echo "cpu-note: [$(up)] $*"; }

blkback_loaded() { grep -q '^xen_blkback ' /proc/modules; }
blkback() { # load | unload
  if [ "$1" = load ]; then
    blkback_loaded || insmod /lib/modules/*/"$(grep -m1 '^xen-blkback' /etc/modules.order)"
  else
    ! blkback_loaded || rmmod xen_blkback
  fi
}

# job NAME -> "rw mix bs iodepth bs_kib"
job() {
  case $1 in
    4k) echo "randrw 50 4k 16 4" ;;
    1m) echo "randrw 50 1M 4 1024" ;;
    *) return 1 ;;
  esac
}

# backend_pids PEER DOMID: the pids (or kernel thread tids) whose CPU time is the backend's
backend_pids() {
  local p c f
  case $1 in
    kernel)
      # xen_update_blkif_status: kthread "%s-%d" of blkback_name's "<domid>.<dev>" and the ring index
      for f in /proc/[0-9]*/comm; do
        read -r c 2>/dev/null <"$f" || continue
        case $c in "$2.$VDEV-"[0-9]*) f=${f#/proc/}; echo "${f%/comm}" ;; esac
      done
      ;;
    qdisk)
      for f in /proc/[0-9]*/cmdline; do
        c=$(tr '\0' ' ' 2>/dev/null <"$f") || continue
        case $c in
          *qemu*"-xen-domid $2 "*"-xen-attach"* | *qemu*"-xen-domid 0 "*"-xen-attach"*) f=${f#/proc/}; echo "${f%/cmdline}" ;;
        esac
      done
      ;;
    blkbackd*)
      for f in /proc/[0-9]*/comm; do
        read -r c 2>/dev/null <"$f" || continue
        case $c in blkbackd*) f=${f#/proc/}; echo "${f%/comm}" ;; esac
      done
      ;;
  esac
}
# snapshot PEER DOMID: "pid utime stime switches" per backend pid: fields 14 and 15 of /proc/PID/stat (in ticks,
# exited threads included) and the context switches (voluntary: it slept; involuntary: preempted) of its live
# threads
snapshot() {
  local p cs
  for p in $(backend_pids "$1" "$2"); do
    cs=$(cat /proc/"$p"/task/*/status 2>/dev/null | awk '/_ctxt_switches:/ { n += $2 } END { print n + 0 }')
    # the fields after "(comm) ": state is the first, utime the 12th, stime the 13th
    sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk -v p="$p" -v cs="$cs" '{ print p, $12, $13, cs }'
  done
}
# dom0's busy ticks: all CPU time but idle and iowait
dom0_busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
console() { tr -d '\r' <"$OUT/console/guest-$1.log" 2>/dev/null; }
# wait_console NAME PATTERN SECONDS INTERVAL: until the console has PATTERN; fails when the guest is gone
wait_console() {
  local i=0 n=$(($3 * 10))
  until grep -aq "$2" "$OUT/console/guest-$1.log" 2>/dev/null; do
    i=$((i + 1))
    [ $i -ge "$n" ] && return 1
    if [ $((i % 20)) = 0 ] && ! xl domid "$1" >/dev/null 2>&1; then grep -aq "$2" "$OUT/console/guest-$1.log"; return; fi
    sleep 0.1
  done
}
wait_gone() {
  local i=0
  while xl domid "$1" >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -ge $(($2 * 2)) ] && { xl destroy "$1"; return 1; }
    sleep 0.5
  done
}

# bin_of PEER: the binary of a blkbackd peer (`blkbackd`: $BIN; `blkbackd-X`: /mnt/host/bin/blkbackd-X, e.g. an
# older build to compare with)
bin_of() { if [ "$1" = blkbackd ]; then echo "$BIN"; else echo "/mnt/host/bin/$1"; fi; }
SVC=0
start_blkbackd() { # BINARY
  mkdir -p $CTL
  # shellcheck disable=SC2086 # BLKBACKD_ARGS is a list of arguments
  (cd /tmp && exec setsid "$1" xen --user 65534:65534 --control-dir $CTL $BLKBACKD_ARGS) >>"$OUT/cpu-blkbackd.log" 2>&1 &
  SVC=$!
  sleep 1
  kill -0 $SVC 2>/dev/null || { note "blkbackd exited at once"; tail -5 "$OUT/cpu-blkbackd.log"; SVC=0; return 1; }
}
stop_blkbackd() {
  [ $SVC != 0 ] || return 0
  kill -TERM $SVC 2>/dev/null
  wait $SVC 2>/dev/null
  SVC=0
}

# run_raw JOB ROUND: the floor of a userspace backend's I/O path, no guest: fio in dom0 (io_uring, O_DIRECT, the
# guest's job, submitting and reaping in batches as a backend serving a ring does) on a fresh loop device like the
# peers'. Its CPU is fio's job thread's (fio's own usr and sys figures: its I/O path and its bookkeeping); it runs
# as fast as its CPU lets it, so its IOPS are not a guest's.
run_raw() {
  local J=$1 R=$2 N="cpu-raw-$1-$2" L DISK rw mix bs qd bskib t0 t1 terse
  read -r rw mix bs qd bskib <<<"$(job "$J")"
  note "=== $N"
  command -v fio >/dev/null || { echo "cpu-per-io: peer=raw job=$J round=$R status=fail why=no-fio-in-dom0"; return; }
  DISK=/tmp/cpu-disk-$N.img
  truncate -s "$DISK_SIZE" "$DISK"
  L=$(/sbin/losetup -f --show "$DISK") || { echo "cpu-per-io: peer=raw job=$J round=$R status=fail why=losetup"; return; }
  USED_LOOPS="$USED_LOOPS $L"
  t0=$(dom0_busy)
  terse=$(fio --name=raw --filename="$L" --ioengine=io_uring --direct=1 --rw="$rw" --rwmixread="$mix" --bs="$bs" \
    --iodepth="$qd" --iodepth_batch_submit=$(((qd + 1) / 2)) --iodepth_batch_complete_min=$(((qd + 3) / 4)) \
    --size="$SIZE" --time_based --runtime="$RUNTIME" --output-format=terse --terse-version=3 2>&1 | grep -a '^3;fio-')
  t1=$(dom0_busy)
  truncate -s 0 "$DISK"
  rm -f "$DISK"
  # terse v3: 6/47 read/write KiB, 8/49 IOPS, 9/50 runtime (ms), 88/89 usr/sys CPU (%), 90 context switches
  awk -F';' -v hz="$HZ" -v bskib="$bskib" -v t0="$t0" -v t1="$t1" -v head="peer=raw job=$J round=$R" '
    NF >= 90 {
      ios = ($6 + $47) / bskib; rt = $9; if ($50 + 0 > rt + 0) rt = $50
      usr = $88; sys = $89; sub(/%/, "", usr); sub(/%/, "", sys)
      ms = (usr + sys) * rt / 100; ums = usr * rt / 100; dom0 = (t1 - t0) * 1000 / hz
      if (ios + 0 == 0) { print "cpu-per-io: " head " status=fail why=no-io"; done = 1; exit }
      printf "cpu-per-io: %s status=ok read_iops=%s write_iops=%s ios=%d runtime_ms=%d backend_cpu_ms=%d us_per_io=%.1f user_us_per_io=%.1f dom0_busy_ms=%d dom0_us_per_io=%.1f switches_per_io=%.3f tasks=1\n",
        head, $8, $49, ios, rt, ms, ms * 1000 / ios, ums * 1000 / ios, dom0, dom0 * 1000 / ios, $90 / ios
      done = 1
    }
    END { if (!done) print "cpu-per-io: " head " status=fail why=no-terse-line" }' <<<"$terse"
}

# run PEER JOB ROUND
run() {
  [ "$1" = raw ] && { blkback unload; run_raw "$2" "$3"; return; }
  local P=$1 J=$2 R=$3 N="cpu-$1-$2-$3" L SPEC DISK DID="" rw mix bs qd bskib a="" b="" t0=0 t1=0 terse st=ok why=""
  read -r rw mix bs qd bskib <<<"$(job "$J")" || { note "unknown job $J"; return; }
  note "=== $N"
  if [ "$P" = kernel ]; then blkback load; else blkback unload; fi
  DISK=/tmp/cpu-disk-$N.img
  truncate -s "$DISK_SIZE" "$DISK"
  L=$(/sbin/losetup -f --show "$DISK") || { echo "cpu-per-io: peer=$P job=$J round=$R status=fail why=losetup"; return; }
  case $P in
    kernel) SPEC="backendtype=phy" ;;
    qdisk) SPEC="backendtype=qdisk" ;;
    blkbackd*) SPEC="backendtype=phy, script=block-userspace"; start_blkbackd "$(bin_of "$P")" || st=fail why=blkbackd-start ;;
  esac
  rm -f "$OUT/console/guest-$N.log"
  mkdomcfg "$N" "'format=raw, vdev=xvdb, access=rw, $SPEC, target=$L'" \
    "xenlab.rw=$rw xenlab.rwmixread=$mix xenlab.bs=$bs xenlab.iodepth=$qd xenlab.runtime=$RUNTIME xenlab.size=$SIZE xenlab.vsize=0 xenlab.shell=1 $DOMU_EXTRA"
  [ $st = ok ] && { xl -vvv create "/tmp/$N.cfg" >"$OUT/xl-$N.log" 2>&1 || { st=fail; why=xl-create; }; }
  DID=$(domid_of "$N")
  if [ $st = ok ] && ! wait_console "$N" '^FIO-START' 240; then st=fail; why=no-fio-start; fi
  if [ $st = ok ] && console "$N" | grep -aq 'DOMU-DEVICE .* sectors=0 '; then st=fail; why=zero-sized-disk; fi
  if [ $st = ok ]; then
    a=$(snapshot "$P" "$DID"); t0=$(dom0_busy)
    local SP=0 w
    for w in $(backend_pids "$P" "$DID"); do [ "$w" != $SVC ] && break; done
    if [ "$STRACE" = 1 ] && [ "${P#blkbackd}" != "$P" ]; then
      strace -c -f -p "$w" -o "$OUT/cpu-strace-$N.txt" 2>/dev/null &
      SP=$!
    elif [ "$PERF" = 1 ] && [ "${P#blkbackd}" != "$P" ]; then
      echo 0 >/proc/sys/kernel/kptr_restrict 2>/dev/null
      echo -1 >/proc/sys/kernel/perf_event_paranoid 2>/dev/null
      # system-wide (`-p` missed the worker's I/O threads here): the reports sort by thread name
      perf record -q -a -e cpu-clock -F 499 -g -o "/tmp/cpu-perf-$N.data" >"$OUT/cpu-perf-record-$N.log" 2>&1 &
      SP=$!
    fi
    sleep $((RUNTIME - 1))
    if ! wait_console "$N" '^FIO-RC=' 120; then st=fail; why=no-fio-rc; fi
    b=$(snapshot "$P" "$DID"); t1=$(dom0_busy)
    [ $SP != 0 ] && { kill -INT $SP; wait $SP; }
    if [ "$PERF" = 1 ] && [ -s "/tmp/cpu-perf-$N.data" ]; then
      perf report -i "/tmp/cpu-perf-$N.data" --stdio --no-children -g none --sort comm --percent-limit 0.5 \
        >"$OUT/cpu-perf-comm-$N.txt" 2>&1
      perf report -i "/tmp/cpu-perf-$N.data" --stdio --no-children -g caller,0.5,callee --sort comm,sym \
        --percent-limit 0.3 >"$OUT/cpu-perf-$N.txt" 2>&1
      perf report -i "/tmp/cpu-perf-$N.data" --stdio --no-children -g none --sort comm,sym --percent-limit 0.2 \
        >"$OUT/cpu-perf-flat-$N.txt" 2>&1
      rm -f "/tmp/cpu-perf-$N.data"
    fi
    if [ "$STATS" = 1 ] && [ "${P#blkbackd}" != "$P" ]; then
      "$(bin_of "$P")" stats --control "$CTL/dom$DID.ctl" --prometheus >"$OUT/cpu-stats-$N.prom" 2>&1
    fi
  fi
  # (the domU waits in a shell after fio: its backend is still there for the snapshot above)
  xl destroy "$N" 2>/dev/null
  wait_gone "$N" 120
  stop_blkbackd
  # Each run gets a loop device never used before: kernel blkback, given a loop device detached (lazily) after
  # an earlier run and attached again, was seen with a 0-sector disk. The used ones stay attached to their
  # emptied (and deleted) file until the end.
  USED_LOOPS="$USED_LOOPS $L"
  truncate -s 0 "$DISK"
  rm -f "$DISK"
  if [ $st != ok ]; then
    echo "cpu-per-io: peer=$P job=$J round=$R status=fail why=$why"
    console "$N" | tail -n 5 | sed 's/^/cpu-note: console: /'
    return
  fi
  terse=$(console "$N" | grep -a '^3;fio-' | tail -n 1)
  # the backend's CPU: per pid, the ticks at FIO-RC minus those at FIO-START (0 if it was not there)
  awk -v hz="$HZ" -v bskib="$bskib" -v t0="$t0" -v t1="$t1" -v head="peer=$P job=$J round=$R" -v domid="$DID" -v terse="$terse" '
    FNR == NR { if (NF == 4) { su[$1] = $2; ss[$1] = $3; sc[$1] = $4 } next }
    NF == 4 {
      du = $2 - su[$1]; d = du + $3 - ss[$1]
      ticks += d; uticks += du; switches += $4 - sc[$1]; tasks++; who = who " " $1 ":" d
    }
    END {
      n = split(terse, f, ";")
      if (n < 50) { print "cpu-per-io: " head " status=fail why=no-terse-line"; exit }
      ios = (f[6] + f[47]) / bskib
      ms = ticks * 1000 / hz; dom0 = (t1 - t0) * 1000 / hz
      rt = f[9]; if (f[50] + 0 > rt + 0) rt = f[50]
      # (no unparenthesized ">" in a printf: awk reads it as a redirection)
      ums = uticks * 1000 / hz
      per = 0; uper = 0; dper = 0; sper = 0
      if (ios + 0 != 0) { per = ms * 1000 / ios; uper = ums * 1000 / ios; dper = dom0 * 1000 / ios; sper = switches / ios }
      printf "cpu-per-io: %s status=ok read_iops=%s write_iops=%s ios=%d runtime_ms=%d backend_cpu_ms=%d us_per_io=%.1f user_us_per_io=%.1f dom0_busy_ms=%d dom0_us_per_io=%.1f switches_per_io=%.3f tasks=%d\n",
        head, f[8], f[49], ios, rt, ms, per, uper, dom0, dper, sper, tasks
      print "cpu-note: " head " domid=" domid " ticks per pid:" who
    }' <(echo "$a") <(echo "$b")
}

note "dom0 $(uname -r), $(nproc) vCPUs, CLK_TCK=$HZ; rounds=$ROUNDS peers=$PEERS jobs=$JOBS runtime=${RUNTIME}s size=$SIZE disk=$DISK_SIZE domu_extra=$DOMU_EXTRA"
[ -x "$BIN" ] || note "no $BIN: the blkbackd peer will fail"
: >"$OUT/cpu-blkbackd.log"
# Kernel blkback's runs come first, all of them with the module loaded once: loaded again after an rmmod (needed
# while the others run: it would take the userspace peer's vbds too), it served 0-sector disks in this lab.
for P in $PEERS; do
  [ "$P" = kernel ] || continue
  for R in $(seq 1 "$ROUNDS"); do
    for J in $JOBS; do run "$P" "$J" "$R"; done
  done
done
for R in $(seq 1 "$ROUNDS"); do
  for J in $JOBS; do
    for P in $PEERS; do [ "$P" = kernel ] || run "$P" "$J" "$R"; done
  done
done
blkback unload
for L in $USED_LOOPS; do /sbin/losetup -d "$L" 2>/dev/null; done
note "done"
