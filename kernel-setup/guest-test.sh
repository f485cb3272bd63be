#!/usr/bin/env bash
# guest-test.sh --socket HOST_SOCK [--cache DIR] [--timeout SECS] [options]
#
# Boots a Debian cloud kernel under QEMU (TCG) with the initramfs built by
# fetch-guest.sh. QEMU connects, as a client, to the NBD server listening on
# the unix socket HOST_SOCK and exposes that byte stream to the guest as the
# virtio-serial port "nbd". The guest's /init bridges the port to a unix
# socket with socat, attaches /dev/nbd0 with the kernel NBD client
# (nbd-client -b 4096 -C 1 -t ...), runs ext4 + raw direct-I/O checks and
# prints "MESHDISK-GUEST-RESULT: ok ..." or "... fail ...".
#
# Options:
#   --socket PATH     unix socket of the NBD server on the host (required)
#   --cache DIR       guest cache (default ${MESHDISK_GUEST_CACHE:-$HOME/.cache/meshdisk-guest})
#   --timeout SECS    kill QEMU after SECS seconds (default 240)
#   --export NAME     NBD export name passed to nbd-client -N (default: none)
#   --data-mib N      MiB of file data the guest writes (default 4)
#   --log FILE        keep the guest console log in FILE (default: temp file)
#   --memory MIB      guest RAM (default 512)
#   --fetch           run fetch-guest.sh first (cheap when the cache is ready)
#   --quiet           do not stream the console; print it only on failure
#
# Exit status: 0 only if the guest printed "MESHDISK-GUEST-RESULT: ok",
# 1 on test failure/timeout, 2 on usage errors, 3 if the cache is missing.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOCKET=""
CACHE=${MESHDISK_GUEST_CACHE:-$HOME/.cache/meshdisk-guest}
TIMEOUT=240
EXPORT=""
DATA_MIB=4
LOG=""
MEM=512
FETCH=0
QUIET=0

usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
    exit "${1:-2}"
}
while [ $# -gt 0 ]; do
    case "$1" in
    --socket) SOCKET=${2:?}; shift ;;
    --cache) CACHE=${2:?}; shift ;;
    --timeout) TIMEOUT=${2:?}; shift ;;
    --export) EXPORT=${2:?}; shift ;;
    --data-mib) DATA_MIB=${2:?}; shift ;;
    --log) LOG=${2:?}; shift ;;
    --memory) MEM=${2:?}; shift ;;
    --fetch) FETCH=1 ;;
    --quiet) QUIET=1 ;;
    -h | --help) usage 0 ;;
    *) echo "guest-test: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done
[ -n "$SOCKET" ] || { echo "guest-test: --socket is required" >&2; usage 2; }
case "$TIMEOUT" in '' | *[!0-9]*) echo "guest-test: bad --timeout" >&2; exit 2 ;; esac
case "$DATA_MIB" in '' | *[!0-9]*) echo "guest-test: bad --data-mib" >&2; exit 2 ;; esac
case "$EXPORT" in *[[:space:]]*) echo "guest-test: export names with spaces are not supported" >&2; exit 2 ;; esac

ENVFILE="$CACHE/guest.env"
# Rebuild the initramfs when guest/init changed since the last fetch (fast:
# fetch-guest.sh reuses the downloaded packages).
if [ "$FETCH" = 0 ] && [ -f "$ENVFILE" ] && [ -f "$SCRIPT_DIR/guest/init" ]; then
    want=$(sha256sum <"$SCRIPT_DIR/guest/init" | cut -d' ' -f1)
    have=$(sed -n "s/^GUEST_INIT_SHA256='\(.*\)'$/\1/p" "$ENVFILE")
    if [ "$want" != "$have" ]; then
        echo "guest-test: kernel-setup/guest/init changed; rebuilding the initramfs" >&2
        FETCH=1
    fi
fi
if [ "$FETCH" = 1 ]; then
    "$SCRIPT_DIR/fetch-guest.sh" "$CACHE" || exit 3
fi
if [ ! -f "$ENVFILE" ]; then
    echo "guest-test: guest cache not ready ($ENVFILE missing); run kernel-setup/fetch-guest.sh${CACHE:+ $CACHE}" >&2
    exit 3
fi
# shellcheck disable=SC1090
. "$ENVFILE"
for f in "$GUEST_KERNEL" "$GUEST_INITRD" "$QEMU_BIN"; do
    [ -e "$f" ] || { echo "guest-test: $f missing; re-run kernel-setup/fetch-guest.sh" >&2; exit 3; }
done
[ -S "$SOCKET" ] || { echo "guest-test: $SOCKET is not a unix socket (is the NBD server running?)" >&2; exit 1; }

TMPDIR_GT=$(mktemp -d "${TMPDIR:-/tmp}/meshdisk-guest.XXXXXX")
[ -n "$LOG" ] || LOG="$TMPDIR_GT/console.log"
: >"$LOG"
QPID=""
TAILPID=""
cleanup() {
    [ -n "$TAILPID" ] && kill "$TAILPID" 2>/dev/null || true
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
        kill -TERM "$QPID" 2>/dev/null || true
        sleep 1
        kill -KILL "$QPID" 2>/dev/null || true
    fi
    rm -rf "$TMPDIR_GT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Let QEMU re-connect its chardev when the server drops the connection (for
# example after a failed handshake), so the guest can retry nbd-client.
# QEMU >= 9.2 spells it reconnect-ms (the seconds form was removed in 10.x).
QVER=$(LD_LIBRARY_PATH="$QEMU_LD_LIBRARY_PATH" "$QEMU_BIN" --version 2>/dev/null | awk '/version/ {print $4; exit}')
QMAJ=${QVER%%.*}
QMIN=${QVER#*.}
QMIN=${QMIN%%.*}
if [ "${QMAJ:-0}" -gt 9 ] || { [ "${QMAJ:-0}" -eq 9 ] && [ "${QMIN:-0}" -ge 2 ]; }; then
    RECONNECT=reconnect-ms=1000
else
    RECONNECT=reconnect=1
fi

# QEMU's chardev parser splits on commas: a path with a comma needs ",,".
QSOCK=${SOCKET//,/,,}
CMDLINE="console=ttyS0 quiet panic=-1 meshdisk.data_mib=$DATA_MIB"
[ -n "$EXPORT" ] && CMDLINE="$CMDLINE meshdisk.export=$EXPORT"

LDATA=()
IFS=: read -r -a _dirs <<<"$QEMU_DATA_DIRS"
for d in "${_dirs[@]}"; do LDATA+=(-L "$d"); done

# shellcheck disable=SC2054 # commas are QEMU option syntax
QEMU_ARGS=(
    -accel tcg
    -machine pc
    -m "$MEM"
    -smp 1
    -nodefaults -no-user-config
    -display none
    -no-reboot
    -kernel "$GUEST_KERNEL"
    -initrd "$GUEST_INITRD"
    -append "$CMDLINE"
    -chardev "file,id=con,path=$LOG"
    -serial chardev:con
    -device virtio-serial-pci
    -chardev "socket,id=nbd0,path=$QSOCK,$RECONNECT"
    -device virtserialport,chardev=nbd0,name=nbd
    -monitor none
)

START=$(date +%s.%N)
echo "guest-test: booting $GUEST_KVER under TCG, NBD via $SOCKET (timeout ${TIMEOUT}s)" >&2
LD_LIBRARY_PATH="$QEMU_LD_LIBRARY_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    QEMU_MODULE_DIR="$QEMU_MODULE_DIR" \
    "$QEMU_BIN" "${LDATA[@]}" "${QEMU_ARGS[@]}" </dev/null >"$TMPDIR_GT/qemu.out" 2>&1 &
QPID=$!
if [ "$QUIET" = 0 ]; then
    tail -n +1 -f --pid="$QPID" "$LOG" &
    TAILPID=$!
fi

TIMED_OUT=0
deadline=$(($(date +%s) + TIMEOUT))
while kill -0 "$QPID" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        TIMED_OUT=1
        echo "guest-test: timeout after ${TIMEOUT}s, killing qemu" >&2
        kill -TERM "$QPID" 2>/dev/null || true
        sleep 2
        kill -KILL "$QPID" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
QRC=0
wait "$QPID" 2>/dev/null || QRC=$?
QPID=""
if [ -n "$TAILPID" ]; then
    # let tail drain the rest of the log
    wait "$TAILPID" 2>/dev/null || true
    TAILPID=""
fi
ELAPSED=$(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

RESULT=$(tr -d '\r' <"$LOG" | grep -a '^MESHDISK-GUEST-RESULT: ' | tail -n1 || true)
if [ -n "$RESULT" ] && [ "${RESULT#MESHDISK-GUEST-RESULT: ok}" != "$RESULT" ] && [ "$TIMED_OUT" = 0 ]; then
    [ "$QUIET" = 1 ] && echo "$RESULT"
    echo "guest-test: PASS in ${ELAPSED}s (qemu exit $QRC)" >&2
    exit 0
fi

{
    echo "guest-test: FAIL after ${ELAPSED}s (qemu exit $QRC, timed out: $TIMED_OUT)"
    if [ -s "$TMPDIR_GT/qemu.out" ]; then
        echo "----- qemu output -----"
        cat "$TMPDIR_GT/qemu.out"
    fi
    echo "----- guest console log ($LOG) -----"
    tr -d '\r' <"$LOG"
    echo "----- end of guest console log -----"
} >&2
# the result line (if any) also goes to stdout for callers grepping it
[ -n "$RESULT" ] && [ "$QUIET" = 1 ] && echo "$RESULT"
[ -n "$RESULT" ] || echo "MESHDISK-GUEST-RESULT: fail no result line from guest (timeout=$TIMED_OUT qemu_exit=$QRC)"
exit 1
