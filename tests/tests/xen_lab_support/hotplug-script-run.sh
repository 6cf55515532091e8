#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# dom0 side of the hotplug-script checks of tests/tests/xen_lab_protocol.rs: `block-blkbackd` run as libxl runs it
# (`XENBUS_PATH=backend/vbd/D/N block-blkbackd add|remove`) against vbd directories written here by hand in the
# real xenstore, with a stand-in for blkbackd that opens what the script pins and writes `opened` = 1.
# Prints `proto-check: script-CASE k=v ...` lines; judges nothing.
set -u
SCRIPT=${SCRIPT:-/mnt/host/bin/block-blkbackd}
BE=/local/domain/0/backend/vbd
check() { echo "proto-check: $*"; }
loops_of() { /sbin/losetup -j "$1" 2>/dev/null | cut -d: -f1 | tr '\n' ' '; }
# fake_domain DOM VM: a domain's name and VM path, as the toolstack writes them
fake_domain() { xenstore-write /local/domain/$1/name "fake$1" /local/domain/$1/vm "$2"; }
# fake_vbd DOM DEV TARGET MODE: a vbd as libxl and blkbackd leave it when the script runs (InitWait, opened 0)
fake_vbd() {
  xenstore-write $BE/$1/$2/params "$3" $BE/$1/$2/mode "$4" $BE/$1/$2/state 2 $BE/$1/$2/opened 0 \
    $BE/$1/$2/frontend-id "$1"
}
# stand_in DOM DEV SECONDS: plays blkbackd: once physical-device-path appears, open it and write opened = 1;
# keep it open SECONDS (the delete-on-close loop device lives as long as this)
stand_in() {
  ( for _ in $(seq 1 100); do
      p=$(xenstore-read $BE/$1/$2/physical-device-path 2>/dev/null) && break
      sleep 0.1
    done
    [ -n "${p:-}" ] || exit 0
    exec 4<"$p"; xenstore-write $BE/$1/$2/opened 1; sleep "$3" ) &
}
run() { XENBUS_PATH=backend/vbd/$1/$2 BLKBACKD_OPEN_TIMEOUT=${3:-5} bash "$SCRIPT" add > /tmp/script.out 2>&1; echo $?; }
msg() { xenstore-read $BE/$1/$2/hotplug-error 2>/dev/null | tr ' ' '_' | cut -c1-100; }

truncate -s 16M /tmp/s1.img
fake_domain 90 /vm/aaaa; fake_domain 91 /vm/bbbb; fake_domain 92 /vm/aaaa
# 1. a stale error node from an earlier attach of the vbd does not fail this one
fake_vbd 90 51712 /tmp/s1.img w
xenstore-write error/backend/vbd/90/51712/error "19 an earlier attach failed"
stand_in 90 51712 30
rc=$(run 90 51712)
check "script-stale-error rc=$rc status=$(xenstore-read $BE/90/51712/hotplug-status 2>/dev/null) error_left=$(xenstore-read error/backend/vbd/90/51712/error >/dev/null 2>&1 && echo 1 || echo 0) loops=[$(loops_of /tmp/s1.img)]"
# 2. the same add again: nothing to do, still connected
rc=$(run 90 51712)
check "script-second-add rc=$rc status=$(xenstore-read $BE/90/51712/hotplug-status 2>/dev/null) loops=[$(loops_of /tmp/s1.img)]"
# 3. another guest asks for the same image writable: refused, nothing attached
fake_vbd 91 51712 /tmp/s1.img w
rc=$(run 91 51712)
check "script-shared rc=$rc status=$(xenstore-read $BE/91/51712/hotplug-status 2>/dev/null) msg=$(msg 91 51712) loops=[$(loops_of /tmp/s1.img)]"
xenstore-rm $BE/91
# 4. the same VM (a migration's or a restore's second domain): allowed
fake_vbd 92 51712 /tmp/s1.img w
stand_in 92 51712 5
rc=$(run 92 51712)
check "script-same-vm rc=$rc status=$(xenstore-read $BE/92/51712/hotplug-status 2>/dev/null) loops=[$(loops_of /tmp/s1.img)]"
# 5. a file without write permission, attached writable: refused
truncate -s 16M /tmp/s2.img; chmod 444 /tmp/s2.img
fake_vbd 93 51712 /tmp/s2.img w
rc=$(run 93 51712)
check "script-readonly-file rc=$rc msg=$(msg 93 51712) loops=[$(loops_of /tmp/s2.img)]"
# 6. blkbackd never opens the device: the script gives up and detaches the loop device it attached
truncate -s 16M /tmp/s3.img
fake_vbd 94 51712 /tmp/s3.img w
rc=$(run 94 51712 2)
check "script-never-opened rc=$rc msg=$(msg 94 51712) loops=[$(loops_of /tmp/s3.img)]"
# 7. remove of a vbd whose loop device number now backs another attach (another diskseq): left alone
truncate -s 16M /tmp/s4.img
L=$(/sbin/losetup -f --show /tmp/s4.img)
xenstore-write $BE/94/51712/physical-device-path "$L" $BE/94/51712/diskseq 1 $BE/94/51712/state 6
XENBUS_PATH=backend/vbd/94/51712 bash "$SCRIPT" remove > /tmp/script.out 2>&1; rc=$?
check "script-remove-reused rc=$rc loops=[$(loops_of /tmp/s4.img)]"
/sbin/losetup -d "$L"
kill $(jobs -p) 2>/dev/null; wait 2>/dev/null
for d in 90 91 92 93 94; do xenstore-rm $BE/$d 2>/dev/null; xenstore-rm /local/domain/$d 2>/dev/null; xenstore-rm error/backend/vbd/$d 2>/dev/null; done
rm -f /tmp/s1.img /tmp/s2.img /tmp/s3.img /tmp/s4.img
