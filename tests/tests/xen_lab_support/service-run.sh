#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# dom0 side of tests/tests/xen_lab_service.rs: `blkbackd xen` as a host service serving three guests at once.
#
# Runs in the lab's dom0 (`xen-lab exec 'bash /mnt/host/bin/service-run.sh'`) and prints what it saw as
#   svc-check: KEY k=v ...     one line per observation (parsed by the Rust test)
#   svc-status: ...            the raw /proc/PID/status lines behind the worker checks
#   svc-result: domu=N ...     one line per guest at the end: fio verify, fio, how the guest ended
#   svc-note: ...              progress, for the human reading a failure
# It asserts nothing itself (exit 0 unless it could not even start); the Rust test judges the lines.
#
# Scenario:
#   1. three tmpfs images + loop devices; `blkbackd xen --user 65534:65534` in its own session, log in
#      /mnt/host/out/service.log;
#   2. three PV domUs created at once (vdev xvdb, script=block-userspace, target=/dev/loopN); domU 2 runs a long
#      verify job, domU 3 a perf job that never ends by itself;
#   3. once every vbd is Connected: per worker (`blkbackd xen-worker --domid D`) its pid, /proc status and the
#      `io_uring ring restricted` lines of the log;
#   4. during domU 2's verify job: SIGKILL to its worker; then a new worker pid for domU 2 is looked for;
#   5. domUs 1 and 2 must power off by themselves (else `xl destroy`, reported as hung);
#   6. once domU 3's verify job passed: `xl destroy` it; its worker must be gone within 5 s;
#   7. SIGTERM to the service: its exit code, and anything left (processes, gntdev mappings, vbds, loop users).
# The service runs with `--control-dir /run/blkbackd --metrics-listen 127.0.0.1:9469`: once every vbd is
# Connected and again after the kill (3b, 4), its one endpoint for all guests is fetched (`svc-check: metrics ...`,
# `svc-check: metrics-after-kill ...`; the texts in $OUT/metrics-*.txt) with bash's /dev/tcp: dom0's HTTP client,
# busybox-static's wget, dies of SIGSEGV (rc 139) even on 127.0.0.1 (static glibc's resolver; the host's does too).
# Knobs (environment): BIN, SVC_USER, DISK_SIZE, VSIZE1..3, RUNTIME1..3, KILL_DELAY, DOMU_TIMEOUT, CONNECT_TIMEOUT,
# METRICS (the endpoint's address).
set -u
. /etc/xenlab/common.sh    # OUT, mkdomcfg, up

BIN=${BIN:-/mnt/host/bin/blkbackd}
SVC_USER=${SVC_USER:-65534:65534}
DISK_SIZE=${DISK_SIZE:-128M}
VSIZE1=${VSIZE1:-8M}; RUNTIME1=${RUNTIME1:-15}
VSIZE2=${VSIZE2:-96M}; RUNTIME2=${RUNTIME2:-15}     # a long verify job: the worker dies during it
# domU 2's block size: 64 KiB is 16 segments, more than a request holds, so blkfront sends indirect requests, and
# the requests the dead worker leaves are indirect ones (answered with their indirect operation, which blkfront
# checks: any other and it disables the disk)
BS2=${BS2:-64k}
VSIZE3=${VSIZE3:-8M}; RUNTIME3=${RUNTIME3:-900}    # runs until `xl destroy`
KILL_DELAY=${KILL_DELAY:-4}                        # seconds into domU 2's verify job
# domU 2's fio engine. Not libaio: once its worker dies, blkfront closes the disk and sets its size to 0, reads
# then end at EOF with 0 bytes, and fio's async engines verify the stale buffer of such a read ("bad header offset
# X, wanted Y": another block's data that never came from the backend). A sync engine fails a 0-byte read with
# EIO instead, so every verify mismatch left is data the backend really returned.
ENGINE2=${ENGINE2:-psync}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-150}            # from the first xl create to every vbd Connected
DOMU_TIMEOUT=${DOMU_TIMEOUT:-240}                  # from Connected to domUs 1 and 2 gone
RESTART_WAIT=${RESTART_WAIT:-10}
GONE_WAIT=${GONE_WAIT:-5}
METRICS=${METRICS:-127.0.0.1:9469}
CONTROL_DIR=/run/blkbackd
DEVID=51728                                        # xvdb
BE=/local/domain/0/backend/vbd
SVC_LOG=$OUT/service.log
DOMUS="1 2 3"
RING_RE='io_uring:? ring restricted'                 # the engine's line (debug level today: see RUST_LOG)
export RUST_LOG=${RUST_LOG:-info,device_blk::engine::uring=debug}

now() { local u _; read -r u _ < /proc/uptime; echo "$u"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
note() { echo "svc-note: [$(now)] $*"; }
check() { echo "svc-check: $*"; }

# workers: one "PID DOMID" line per process with an argument `xen-worker` (one grep over every command line,
# then bash builtins: a process started per /proc entry takes seconds in the TCG dom0; `[r]` keeps grep's own
# command line from matching)
workers() {
  local f p i a d
  for f in $(grep -l -a 'xen-worke[r]' /proc/[0-9]*/cmdline 2>/dev/null); do
    a=()
    mapfile -d '' -t a 2>/dev/null < "$f" || continue
    p=${f#/proc/}; p=${p%/cmdline}
    for ((i = 0; i < ${#a[@]}; i++)); do
      [ "${a[i]}" = xen-worker ] || continue
      d=""
      for ((i = 0; i < ${#a[@]}; i++)); do
        case "${a[i]}" in
          --domid) d=${a[i+1]:-} ;;
          --domid=*) d=${a[i]#--domid=} ;;
        esac
      done
      echo "$p ${d:-?}"
      break
    done
  done
}
# Fork-free helpers for the timed loops (a fork can take 100+ ms in the TCG dom0 under load, which would be
# measured as the service's latency): CS = dom0 uptime in centiseconds (= clock ticks, CLK_TCK 100).
cs() { local u _; read -r u _ < /proc/uptime; CS=${u/./}; CS=$((10#$CS)); }
secs() { printf '%d.%02d' $(($1 / 100)) $(($1 % 100)); }    # centiseconds -> seconds
# CHILD_WORKER = the pid of the service's child process serving domain $1 (xen-worker --domid $1), or empty
child_worker() {
  local t c p a i
  CHILD_WORKER=""
  for t in /proc/$SVC/task/*/children; do
    read -r -a c 2>/dev/null < "$t" || true
    for p in "${c[@]}"; do
      a=(); mapfile -d '' -t a 2>/dev/null < "/proc/$p/cmdline" || continue
      for ((i = 0; i < ${#a[@]}; i++)); do
        if [ "${a[i]}" = --domid ] && [ "${a[i+1]:-}" = "$1" ]; then CHILD_WORKER=$p; return; fi
        if [ "${a[i]}" = "--domid=$1" ]; then CHILD_WORKER=$p; return; fi
      done
    done
  done
}
# STARTED = when process $1 started, in dom0 uptime centiseconds (field 22 of /proc/PID/stat)
started_cs() { local s; STARTED=""; read -r s 2>/dev/null < "/proc/$1/stat" || return; s=${s##*) }; set -- $s; STARTED=${20}; }
worker_of() { workers | awk -v d="$1" '$2 == d { print $1 }' | head -n1; }
# blkbackd processes: comm or argv[0] naming blkbackd
blkbackd_procs() {
  local f p c a
  for f in /proc/[0-9]*/comm; do
    p=${f#/proc/}; p=${p%/comm}
    c=""; read -r c 2>/dev/null < "$f"
    a=(); mapfile -d '' -t a 2>/dev/null < "/proc/$p/cmdline"
    case "$c ${a[0]:-}" in *blkbackd*) echo -n "$p(${a[1]:-}${a[2]:+ ${a[2]}}${a[3]:+ ${a[3]}}) " ;; esac
  done
}
# status_kv PID: the privilege lines of /proc/PID/status as KEY=v1,v2,... (tabs become commas)
status_kv() {
  awk '/^(Uid|Gid|CapEff|CapPrm|CapBnd|Seccomp|NoNewPrivs):/ {
         k = $1; sub(":", "", k); v = $2; for (i = 3; i <= NF; i++) v = v "," $i; printf " %s=%s", k, v }' \
      "/proc/$1/status" 2>/dev/null
}
status_raw() { grep -E '^(Uid|Gid|CapEff|CapPrm|CapBnd|Seccomp|NoNewPrivs):' "/proc/$2/status" 2>/dev/null | sed "s/^/svc-status: $1 pid=$2 /"; }
# gntdev mappings in the maps files given (one grep for all: a process per file is slow in the TCG dom0)
gntdev_maps() { grep -c /dev/xen/gntdev "$@" /dev/null 2>/dev/null | awk -F: '{ s += $NF } END { print s + 0 }'; }
# PID:/dev/loopN for every open loop device (one ls for every process)
loop_users() {
  ls -l /proc/[0-9]*/fd/ 2>/dev/null | awk '/^\/proc\/[0-9]+\/fd\/?:$/ { split($1, a, "/"); p = a[3] }
                                           / -> \/dev\/loop/ { printf "%s:%s ", p, $NF }'
}
domid_name() { xl domid "$1" 2>/dev/null; }
# http_get HOST:PORT PATH: the body of an HTTP/1.0 GET on stdout; 0 if the answer was 200
http_get() {
  local host=${1%:*} port=${1##*:} status line
  exec 9<>"/dev/tcp/$host/$port" || return 7
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&9
  IFS= read -r -t 10 status <&9 || { exec 9<&-; return 8; }
  while IFS= read -r -t 10 line <&9 && [ -n "${line%$'\r'}" ]; do :; done    # the headers
  timeout 15 cat <&9
  exec 9<&-
  case "$status" in *" 200 "*) return 0 ;; *) echo "status: $status" >&2; return 9 ;; esac
}
# per_guest TEXT FAMILY: "domid:value," for each sample of FAMILY in TEXT (one per guest)
per_guest() {
  printf '%s\n' "$1" | awk -F'[{}]' -v f="$2" 'index($0, f "{") == 1 {
      if (match($2, /domid="[0-9]+"/)) { d = substr($2, RSTART + 7, RLENGTH - 8); split($3, v, " "); printf "%s:%s,", d, v[1] } }'
}
# metrics_check KEY: fetch the service's /metrics once and report what it holds: the distinct domid labels, the
# HELP lines (each family once: help = help_distinct), blkbackd_xen_workers, how many workers' statistics the
# scrape has, read requests per guest, worker restarts per guest, and the grant pages each broker charges its
# worker and its budget
metrics_check() {
  local key=$1 m rc helps names domids ndom workers ok reads restarts gpages gbudget
  m=$(http_get "$METRICS" /metrics 2>"$OUT/metrics-$key.err"); rc=$?
  printf '%s\n' "$m" > "$OUT/metrics-$key.txt"
  helps=$(printf '%s\n' "$m" | grep -c '^# HELP ')
  names=$(printf '%s\n' "$m" | awk '/^# HELP / { print $3 }' | sort -u | grep -c .)
  domids=$(printf '%s\n' "$m" | grep -o 'domid="[0-9]*"' | tr -dc '0-9\n' | sort -n -u | tr '\n' ',' | sed 's/,$//')
  ndom=$(printf '%s' "$domids" | tr ',' '\n' | grep -c .)
  workers=$(printf '%s\n' "$m" | awk '$1 == "blkbackd_xen_workers" { print $2 }')
  ok=$(printf '%s\n' "$m" | awk '/^blkbackd_xen_worker_scrape_ok\{/ && $2 == 1 { n++ } END { print n + 0 }')
  reads=$(printf '%s\n' "$m" | awk -F'[{}]' '/^blkbackd_requests_total\{/ && /op="read"/ {
      if (match($2, /domid="[0-9]+"/)) { d = substr($2, RSTART + 7, RLENGTH - 8); split($3, v, " "); r[d] += v[1] } }
    END { for (d in r) printf "%s:%d,", d, r[d] }')
  restarts=$(per_guest "$m" blkbackd_xen_worker_restarts_total)
  gpages=$(per_guest "$m" blkbackd_xen_worker_grant_pages)
  gbudget=$(per_guest "$m" blkbackd_xen_worker_grant_pages_budget)
  check "$key fetched=$([ "$rc" = 0 ] && [ -n "$m" ] && echo 1 || echo 0) http_rc=$rc bytes=${#m} domids=$ndom domid_list=[$domids] help=$helps help_distinct=$names workers=${workers:-none} scrape_ok=$ok reads=[${reads%,}] restarts=[${restarts%,}] grant_pages=[${gpages%,}] grant_budget=[${gbudget%,}]"
  [ "$rc" = 0 ] || sed 's/^/svc-note: http_get: /' "$OUT/metrics-$key.err"
}
alive() { xenstore-read "/local/domain/$1/name" >/dev/null 2>&1; }
console() { tr -d '\r' < "$OUT/console/guest-svc$1.log" 2>/dev/null; }

T0=$(now)
note "dom0 $(uname -r); $(xl info | grep -E '^free_memory' | tr -s ' ')"
[ -x "$BIN" ] || { echo "svc-error: $BIN missing"; exit 2; }

# ------------------------------------------------------------------ 1. disks and the service
declare -A LOOP DID WPID DONE
for n in $DOMUS; do
  rm -f /tmp/svc$n.img; truncate -s "$DISK_SIZE" /tmp/svc$n.img
  LOOP[$n]=$(/sbin/losetup -f --show /tmp/svc$n.img) || { echo "svc-error: losetup failed"; exit 2; }
done
note "loop devices: ${LOOP[1]} ${LOOP[2]} ${LOOP[3]}"

: > "$SVC_LOG"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up    # the metrics endpoint listens on 127.0.0.1
( cd /tmp && exec setsid "$BIN" xen --user "$SVC_USER" --control-dir "$CONTROL_DIR" --metrics-listen "$METRICS" ) >> "$SVC_LOG" 2>&1 &
SVC=$!
trap 'kill -KILL $SVC 2>/dev/null' EXIT
up_ok=0
for _ in $(seq 1 75); do
  kill -0 $SVC 2>/dev/null || break
  if grep -qE 'serving xen vbds|supervis|watching' "$SVC_LOG"; then up_ok=1; break; fi
  sleep 0.2
done
if ! kill -0 $SVC 2>/dev/null; then
  wait $SVC; rc=$?
  check "service up=0 exited_rc=$rc"; echo "svc-error: the service exited at once (rc=$rc)"; tail -20 "$SVC_LOG"; exit 0
fi
sleep 1
check "service up=1 pid=$SVC log_line=$up_ok cmd=[$BIN xen --user $SVC_USER --control-dir $CONTROL_DIR --metrics-listen $METRICS]$(status_kv $SVC)"
status_raw service $SVC
check "service-threads pid=$SVC seccomp=[$(cat /proc/$SVC/task/*/status 2>/dev/null | awk '/^Seccomp:/ { printf "%s", $2 }')] capeff=[$(cat /proc/$SVC/task/*/status 2>/dev/null | awk '/^CapEff:/ { printf "%s ", $2 }')]"

# ------------------------------------------------------------------ 2. three domUs at once
declare -A VS RT ENG BSZ
VS[1]=$VSIZE1; RT[1]=$RUNTIME1; VS[2]=$VSIZE2; RT[2]=$RUNTIME2; VS[3]=$VSIZE3; RT[3]=$RUNTIME3
ENG[1]=libaio; ENG[2]=$ENGINE2; ENG[3]=libaio
BSZ[1]=4k; BSZ[2]=$BS2; BSZ[3]=4k
T_CREATE=$(now)
for n in $DOMUS; do
  mkdomcfg svc$n "'format=raw, vdev=xvdb, access=rw, backendtype=phy, script=block-userspace, target=${LOOP[$n]}'" \
    "xenlab.runtime=${RT[$n]} xenlab.vsize=${VS[$n]} xenlab.ioengine=${ENG[$n]} xenlab.bs=${BSZ[$n]}"
  ( xl -vvv create /tmp/svc$n.cfg > "$OUT/xl-svc$n.log" 2>&1; echo $? > /tmp/xlrc-$n ) &
done
wait_xl() { local n; for n in $DOMUS; do while [ ! -e /tmp/xlrc-$n ]; do sleep 0.5; done; done; }
wait_xl
for n in $DOMUS; do
  DID[$n]=$(domid_name svc$n)
  check "created domu=$n name=svc$n xl_rc=$(cat /tmp/xlrc-$n) domid=${DID[$n]:-none} loop=${LOOP[$n]} vsize=${VS[$n]} runtime=${RT[$n]} ioengine=${ENG[$n]} bs=${BSZ[$n]}"
  [ "$(cat /tmp/xlrc-$n)" = 0 ] || grep -a 'libxl: error' "$OUT/xl-svc$n.log" | head -3 | sed 's/^/svc-note: /'
done
note "xl create x3 took $(since $T_CREATE) s"

connected() { # every vbd: backend and frontend state 4
  local n
  for n in $DOMUS; do
    [ -n "${DID[$n]}" ] || return 1
    [ "$(xenstore-read $BE/${DID[$n]}/$DEVID/state 2>/dev/null)" = 4 ] || return 1
    [ "$(xenstore-read /local/domain/${DID[$n]}/device/vbd/$DEVID/state 2>/dev/null)" = 4 ] || return 1
  done
}
conn=0
while [ "$(since $T_CREATE | cut -d. -f1)" -lt "$CONNECT_TIMEOUT" ]; do
  if connected; then conn=1; break; fi
  sleep 0.5
done
connected && conn=1   # once more: the loop's own slowness must not count
states=""
for n in $DOMUS; do
  states+=" be$n=$(xenstore-read $BE/${DID[$n]:-x}/$DEVID/state 2>/dev/null || echo -) fe$n=$(xenstore-read /local/domain/${DID[$n]:-x}/device/vbd/$DEVID/state 2>/dev/null || echo -)"
done
check "connected all=$conn after_s=$(since $T_CREATE)$states"

# ------------------------------------------------------------------ 3. the workers
sleep 1   # rings are set up just after Connected is written
all=$(workers)
check "workers count=$(echo -n "$all" | grep -c .) list=[$(echo "$all" | tr '\n' ';')]"
restricted_total=$(grep -cE "$RING_RE" "$SVC_LOG")
for n in $DOMUS; do
  d=${DID[$n]:-x}
  p=$(echo "$all" | awk -v d="$d" '$2 == d { print $1 }' | head -n1)
  WPID[$n]=$p
  # ring lines naming this guest (domid=D, domid: D, domain D, frontend_domid=D) or this pid
  rr=$(grep -E "$RING_RE" "$SVC_LOG" | grep -cE "(domid|domain|frontend_domid|frontend-domid)[=: ]+\"?$d\b|pid[=: ]+$p\b")
  if [ -n "$p" ]; then
    check "worker domu=$n domid=$d pid=$p ring_restricted=$rr$(status_kv $p) threads=$(awk '/^Threads:/ {print $2}' /proc/$p/status)"
    status_raw "worker domu=$n" "$p"
  else
    check "worker domu=$n domid=$d pid=none ring_restricted=$rr"
  fi
done
check "rings restricted_total=$restricted_total gntdev_maps_service=$(gntdev_maps /proc/$SVC/maps)"
# The workers make their rings before they lock down and may make none after: every data plane still runs on
# io_uring (a worker that tried a ring of its own would fall back to synchronous I/O and log it).
check "engines started=$(grep -c 'data plane started' "$SVC_LOG") io_uring=$(grep 'data plane started' "$SVC_LOG" | grep -c 'io_uring') fallback=$(grep -cE 'falling back to synchronous|gets an engine of its own' "$SVC_LOG")"

# ------------------------------------------------------------------ 3b. one metrics endpoint for every guest
metrics_check metrics

# ------------------------------------------------------------------ 4. kill domU 2's worker during its verify job
T_V=$(now)
while ! console 2 | grep -q FIO-VERIFY-START && [ "$(since $T_V | cut -d. -f1)" -lt 120 ] && alive ${DID[2]}; do sleep 0.5; done
sleep "$KILL_DELAY"
phase=verify
console 2 | grep -q FIO-VERIFY-START || phase=before-verify
console 2 | grep -q FIO-VERIFY-RC && phase=after-verify
old=$(worker_of ${DID[2]})
if [ -n "$old" ]; then
  kill -KILL "$old"; cs; K=$CS; T_KILL=$(now); W_KILL=$(date -u +%T)
  check "kill domu=2 domid=${DID[2]} pid=$old signal=KILL phase=$phase at=${W_KILL}Z"
  # a new child with --domid D: observed (after_s, includes this loop's own latency), and when it really
  # started (started_after_s, from its /proc start time)
  new=""; seen=""
  while cs; [ $((CS - K)) -lt $((RESTART_WAIT * 100)) ]; do
    child_worker ${DID[2]}
    if [ -n "$CHILD_WORKER" ] && [ "$CHILD_WORKER" != "$old" ]; then new=$CHILD_WORKER; seen=$(secs $((CS - K))); break; fi
    sleep 0.05
  done
  [ -n "$new" ] || { new=$(worker_of ${DID[2]}); [ "$new" != "$old" ] || new=""; [ -z "$new" ] || seen=$(since $T_KILL); }
  # What the new worker is, then the metrics, at once and in that order, before anything slower: the guest powers
  # off some seconds later (its I/O failed), and its worker and its series go with its vbds (a fetch after the
  # checks below once found the restart count gone; the /proc reads, after the fetch, found the worker gone).
  if [ -n "$new" ]; then
    started_cs $new
    RESTARTED="restart domu=2 old=$old new=$new after_s=$seen started_after_s=${STARTED:+$(secs $((STARTED - K)))}$(status_kv $new)"
    RESTARTED_RAW=$(status_raw "restarted worker domu=2" "$new")
    metrics_check metrics-after-kill
  fi
  d2=${DID[2]}
  # the killed guest's vbd: closed by the supervisor (backend 5 Closing / 6 Closed), or already gone with the guest.
  # Looked at before the slower checks below: in a loaded dom0 they took 50 s once, the guest powered off
  # meanwhile and the toolstack's teardown was under way (the state node read empty).
  T_S=$(now); bs=""
  while [ "$(since $T_S | cut -d. -f1)" -lt 5 ]; do
    bs=$(xenstore-read $BE/$d2/$DEVID/state 2>/dev/null || echo gone)
    case "$bs" in 5|6|gone) break ;; esac
    sleep 0.2
  done
  case "$bs" in 5|6|gone) ;; *) note "vbd-after-kill: backend state '$bs': $(xenstore-ls -f $BE/$d2 2>&1 | tr '\n' ';')" ;; esac
  check "vbd-after-kill domu=2 backend_state=$bs frontend_state=$(xenstore-read /local/domain/$d2/device/vbd/$DEVID/state 2>/dev/null || echo gone) after_kill_s=$(since $T_KILL)"
  if [ -n "$new" ]; then
    check "$RESTARTED"
    echo "$RESTARTED_RAW"
  else
    check "restart domu=2 old=$old new=none waited_s=$RESTART_WAIT"
  fi
  check "restart-log domu=2 died=$(grep -cE "worker died.*domid=$d2\b" "$SVC_LOG") started=$(grep -cE "worker started.*domid=$d2\b" "$SVC_LOG") closed=$(grep -cE "closed the dead worker's vbd" "$SVC_LOG") answered=$(grep -E "closed the dead worker's vbd" "$SVC_LOG" | sed -n 's/.*answered=\([0-9]*\).*/\1/p' | tail -n1)"
  check "after-kill service_alive=$(kill -0 $SVC 2>/dev/null && echo 1 || echo 0) other_workers=[$(workers | tr '\n' ';')]"
else
  check "kill domu=2 domid=${DID[2]} pid=none phase=$phase (no xen-worker process for this guest)"
fi

# ------------------------------------------------------------------ 5. domUs 1 and 2 power off by themselves
declare -A END
T_W=$(now)
for n in 1 2; do
  while alive ${DID[$n]:-x} && [ "$(since $T_W | cut -d. -f1)" -lt "$DOMU_TIMEOUT" ]; do sleep 1; done
  if alive ${DID[$n]:-x}; then
    END[$n]=hung; note "domU $n still running $DOMU_TIMEOUT s later: xl destroy"; xl destroy svc$n
  else
    END[$n]=poweroff
  fi
  note "domU $n ended (${END[$n]}) $(since $T_CREATE) s after xl create"
done
# their workers end with their last vbd
for n in 1 2; do
  T_G=$(now); p=""
  while :; do p=$(worker_of ${DID[$n]:-x}); [ -z "$p" ] && break; [ "$(since $T_G | cut -d. -f1)" -ge 10 ] && break; sleep 0.2; done
  check "domu-gone domu=$n worker_left=${p:-none} waited_s=$(since $T_G) vbd_dir=$(xenstore-list $BE/${DID[$n]:-x} >/dev/null 2>&1 && echo present || echo gone)"
done

# ------------------------------------------------------------------ 6. xl destroy domU 3 once its verify job passed
T_V=$(now)
while ! console 3 | grep -q FIO-VERIFY-RC && [ "$(since $T_V | cut -d. -f1)" -lt 180 ] && alive ${DID[3]:-x}; do sleep 1; done
if alive ${DID[3]:-x}; then
  p3=$(worker_of ${DID[3]})
  cs; D0=$CS; xl destroy svc3; drc=$?; cs; D1=$CS
  END[3]=destroyed
  # the known worker pid: gone once the service reaped it (builtins only, see cs)
  gone=""; from_start=""; [ -n "$p3" ] || gone=n/a
  while [ -z "$gone" ]; do
    cs
    if [ ! -e /proc/$p3/stat ]; then gone=$(secs $((CS - D1))); from_start=$(secs $((CS - D0))); break; fi
    [ $((CS - D1)) -lt 1500 ] || break
    sleep 0.05
  done
  # gone before xl destroy returned: 0
  case "$gone" in -*) gone=0.00 ;; esac
  check "destroy domu=3 domid=${DID[3]} worker=${p3:-none} xl_destroy_rc=$drc xl_destroy_s=$(secs $((D1 - D0))) worker_gone_s=${gone:-never} gone_after_destroy_start_s=${from_start:-} vbd_dir=$(xenstore-list $BE/${DID[3]} >/dev/null 2>&1 && echo present || echo gone)"
else
  END[3]=poweroff
  check "destroy domu=3 domid=${DID[3]:-none} skipped: the domU was already gone"
fi

# ------------------------------------------------------------------ 7. SIGTERM to the service
check "before-sigterm service_alive=$(kill -0 $SVC 2>/dev/null && echo 1 || echo 0) workers=[$(workers | tr '\n' ';')] gntdev_maps_service=$(gntdev_maps /proc/$SVC/maps)"
kill -TERM $SVC; T_T=$(now)
while kill -0 $SVC 2>/dev/null && [ "$(since $T_T | cut -d. -f1)" -lt 20 ]; do sleep 0.2; done
if kill -0 $SVC 2>/dev/null; then
  kill -KILL $SVC; wait $SVC; check "sigterm rc=none exited=0 killed_after_s=20"
else
  wait $SVC; rc=$?; check "sigterm rc=$rc exited=1 after_s=$(since $T_T)"
fi
trap - EXIT
sleep 0.5
vbds=""
for d in $(xenstore-list $BE 2>/dev/null); do
  for v in $(xenstore-list $BE/$d 2>/dev/null); do vbds+="$d/$v:$(xenstore-read $BE/$d/$v/state 2>/dev/null || echo -);"; done
done
doms=$(xl list 2>/dev/null | awk 'NR > 1 && $1 != "Domain-0" { printf "%s;", $1 }')
check "leftovers blkbackd_procs=[$(blkbackd_procs)] gntdev_maps=$(gntdev_maps /proc/[0-9]*/maps) loop_users=[$(loop_users)] vbds=[$vbds] domains=[$doms]"
for n in $DOMUS; do /sbin/losetup -d ${LOOP[$n]} 2>/dev/null; rm -f /tmp/svc$n.img; done
check "loops_after=[$(/sbin/losetup -a | tr '\n' ';')]"

# ------------------------------------------------------------------ results per guest
for n in $DOMUS; do
  c=$(console $n)
  vrc=$(echo "$c" | sed -n 's/.*FIO-VERIFY-RC=\([0-9]*\).*/\1/p' | tail -n1)
  frc=$(echo "$c" | sed -n 's/.*FIO-RC=\([0-9]*\).*/\1/p' | tail -n1)
  case "$vrc" in 0) v=OK ;; "") v=none ;; *) v="FAIL(rc=$vrc)" ;; esac
  eio=$(echo "$c" | grep -cE 'Input/output error|I/O error')
  # blkfront giving up on the ring (a malformed response): the guest's in-flight I/O then never completes
  fe=$(echo "$c" | grep -cE 'response has (wrong operation|incorrect id)|response references no pending|disabled for further use')
  bad=$(echo "$c" | grep -ciE 'verify: bad|verify failed|verify type mismatch|bad magic|bad header')
  dev=$(echo "$c" | grep -q DOMU-DEVICE && echo 1 || echo 0)
  echo "svc-result: domu=$n name=svc$n domid=${DID[$n]:-none} device=$dev verify=$v fio_rc=${frc:-none} end=${END[$n]:-unknown} eio_lines=$eio mismatch_lines=$bad blkfront_errors=$fe poweroff_line=$(echo "$c" | grep -c DOMU-POWEROFF)"
done
note "done in $(since $T0) s"
exit 0
