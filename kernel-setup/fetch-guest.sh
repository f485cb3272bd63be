#!/usr/bin/env bash
# fetch-guest.sh [CACHE_DIR]
#
# Downloads (with `apt-get download`, never `apt-get install`) and unpacks
# everything the kernel-NBD guest test needs into CACHE_DIR:
#
#   * a Debian cloud kernel (linux-image-cloud-amd64 -> linux-image-6.1.*-cloud-amd64)
#   * qemu-system-x86 + its data/firmware + any shared libraries the host lacks
#   * busybox-static, socat, nbd-client, e2fsprogs and their shared libraries
#
# and builds CACHE_DIR/initramfs.cpio.gz from kernel-setup/guest/init.
#
# CACHE_DIR defaults to ${MESHDISK_GUEST_CACHE:-$HOME/.cache/meshdisk-guest}.
# The script is idempotent: every stage leaves a stamp file and is skipped
# when its stamp matches. The package set is resolved with apt once and
# recorded in CACHE_DIR/packages.env; --refresh re-resolves it (newer kernel,
# security updates), --force redoes every stage. Editing guest/init only
# rebuilds the initramfs.
#
# Nothing is installed on the host. The only host-level action is
# `apt-get update` when the package lists are empty/stale (needs root).
#
# On success it writes CACHE_DIR/guest.env, which kernel-setup/guest-test.sh
# sources to find the kernel, initramfs and QEMU.
set -euo pipefail

FETCH_FORMAT=1 # bump to invalidate old caches when the layout changes

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC="$SCRIPT_DIR/guest/init"

FORCE=0
REFRESH=${MESHDISK_GUEST_REFRESH:-0}
CACHE=""
while [ $# -gt 0 ]; do
    case "$1" in
    --force) FORCE=1 ;;
    --refresh) REFRESH=1 ;;
    -h | --help)
        awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    -*)
        echo "fetch-guest: unknown option $1" >&2
        exit 2
        ;;
    *) CACHE="$1" ;;
    esac
    shift
done
CACHE=${CACHE:-${MESHDISK_GUEST_CACHE:-$HOME/.cache/meshdisk-guest}}

log() { echo "fetch-guest: $*" >&2; }
die() {
    echo "fetch-guest: ERROR: $*" >&2
    exit 1
}
# shellcheck disable=SC2154 # rc is assigned inside the trap
trap 'rc=$?; [ "$rc" -eq 0 ] || echo "fetch-guest: FAILED (exit $rc); cache: $CACHE" >&2' EXIT

for tool in apt-get apt-cache dpkg dpkg-query dpkg-deb gzip sha256sum find sort awk; do
    command -v "$tool" >/dev/null 2>&1 || die "required host tool '$tool' not found (this script needs a Debian/Ubuntu host with apt)"
done
[ -f "$INIT_SRC" ] || die "guest init script not found at $INIT_SRC"
[ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 hosts are supported"

mkdir -p "$CACHE" || die "cannot create cache dir $CACHE"
CACHE=$(cd "$CACHE" && pwd)
DEBS="$CACHE/debs"
QROOT="$CACHE/qemu-root"
KROOT="$CACHE/kernel-root"
GROOT="$CACHE/guest-root"
STAGE="$CACHE/initramfs-staging"
INITRD="$CACHE/initramfs.cpio.gz"
ENVFILE="$CACHE/guest.env"

if [ "$FORCE" = 1 ]; then
    log "--force: removing stamps"
    rm -f "$CACHE"/.stamp-*
fi

stamp_ok() { [ -f "$CACHE/.stamp-$1" ] && [ "$(cat "$CACHE/.stamp-$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" >"$CACHE/.stamp-$1"; }

# ---------------------------------------------------------------------------
# 0. apt lists: make sure apt-cache knows the packages we need.
# ---------------------------------------------------------------------------
have_candidate() {
    local c
    c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$c" ] && [ "$c" != "(none)" ]
}

ensure_apt_lists() {
    if have_candidate linux-image-cloud-amd64 && have_candidate qemu-system-x86 &&
        have_candidate busybox-static && have_candidate socat; then
        return 0
    fi
    log "package lists lack the needed packages; running apt-get update"
    if [ "$(id -u)" != 0 ]; then
        die "apt package lists are empty or stale and we are not root: run 'sudo apt-get update' first"
    fi
    apt-get update -qq >&2 || die "apt-get update failed"
    have_candidate linux-image-cloud-amd64 || die "apt has no candidate for linux-image-cloud-amd64 (is a Debian 'main' source configured?)"
    have_candidate qemu-system-x86 || die "apt has no candidate for qemu-system-x86"
}

# ---------------------------------------------------------------------------
# 1. Resolve the package set.
# ---------------------------------------------------------------------------
is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# Recursive Depends/PreDepends closure of the given packages (real packages only).
closure() {
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "$@" 2>/dev/null |
        grep -E '^[a-z0-9]' | sort -u
}

resolve_packages() {
    # --- kernel -----------------------------------------------------------
    KPKG=${MESHDISK_GUEST_KERNEL_PKG:-}
    if [ -z "$KPKG" ]; then
        KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '/Depends: linux-image-/ {print $2; exit}')
    fi
    [ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-cloud-amd64"

    # --- qemu -------------------------------------------------------------
    # Prefer the suite that the host's qemu-utils came from (e.g.
    # bookworm-backports) when apt knows qemu-system-x86 at that exact
    # version; otherwise take the default candidate. Either way nothing is
    # installed, so the host's qemu-utils is never downgraded.
    QSUFFIX=""
    local qv suite
    qv=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ -n "$qv" ]; then
        suite=$(apt-cache madison qemu-system-x86 2>/dev/null |
            awk -F'|' -v v="$qv" '{gsub(/ /,"",$2)} $2==v {split($3,a," "); split(a[2],b,"/"); print b[1]; exit}')
        if [ -n "$suite" ]; then
            QSUFFIX="/$suite"
            log "using qemu-system-x86 from $suite (same as installed qemu-utils $qv)"
        else
            log "qemu-system-x86 $qv (installed qemu-utils version) is not available from apt; using the default candidate (download only, host qemu-utils is left alone)"
        fi
    fi
    QPKGS="qemu-system-x86$QSUFFIX qemu-system-common$QSUFFIX qemu-system-data$QSUFFIX seabios"
    # Shared libraries qemu needs that the host does not have. libelogind0 is
    # an alternative to libsystemd0 and would shadow it; pam/passwd are not
    # libraries qemu links.
    QLIBS=$(closure qemu-system-x86 | grep -E '^lib' |
        grep -vE '^(libelogind0|libpam|libsemanage|libc6$|libc-bin$|libdebian-installer4|libnewt|libslang2|libtextwrap1)' |
        while read -r p; do is_installed "$p" || echo "$p"; done | tr '\n' ' ')

    # --- guest userland ---------------------------------------------------
    GTOP="busybox-static socat nbd-client e2fsprogs"
    # (libdebian-installer4/libnewt/libslang2/libtextwrap1 only come in via
    # cdebconf, an alternative to debconf; no guest binary links them.)
    GLIBS=$(closure $GTOP | grep -E '^lib' |
        grep -vE '^(libelogind0|libpam|libdebian-installer4|libnewt|libslang2|libtextwrap1)' | tr '\n' ' ')
}

# ---------------------------------------------------------------------------
# 2. Download.
# ---------------------------------------------------------------------------
download() {
    # $1: destination folder, rest: package specs for apt-get download
    local dest=$1
    shift
    mkdir -p "$dest"
    if ! (cd "$dest" && apt-get download -qq "$@" >&2 2>"$dest/.apt-download.log"); then
        cat "$dest/.apt-download.log" >&2
        log "apt-get download failed for: $*"
        return 1
    fi
}

# ---------------------------------------------------------------------------
# 3. Unpack.
# ---------------------------------------------------------------------------
unpack_all() {
    # $1: folder of .debs, $2: target root
    local src=$1 dst=$2 deb
    rm -rf "$dst"
    mkdir -p "$dst"
    for deb in "$src"/*.deb; do
        dpkg -x "$deb" "$dst" || die "dpkg -x $deb failed"
    done
}

deb_versions() {
    local deb
    for deb in "$1"/*.deb; do
        dpkg-deb -W --showformat='${Package}=${Version}\n' "$deb"
    done | sort
}

# ---------------------------------------------------------------------------
# main: download + unpack (stamped by the resolved package set)
# ---------------------------------------------------------------------------
# Fast path: once everything was fetched, reuse the recorded package set
# instead of asking apt again (no apt lists or network needed). --refresh
# (or MESHDISK_GUEST_REFRESH=1) re-resolves and picks up newer packages.
PKGFILE="$CACHE/packages.env"
resolve_and_record() {
    resolve_packages
    {
        echo "# package set resolved by fetch-guest.sh; delete or use --refresh to re-resolve"
        printf "KPKG='%s'\nQPKGS='%s'\nQLIBS='%s'\nGTOP='%s'\nGLIBS='%s'\n" "$KPKG" "$QPKGS" "$QLIBS" "$GTOP" "$GLIBS"
    } >"$PKGFILE"
    pkg_hash
}
pkg_hash() {
    PKGSPEC="format=$FETCH_FORMAT kernel=$KPKG qemu=$QPKGS qlibs=$QLIBS guest=$GTOP glibs=$GLIBS"
    PKGHASH=$(printf '%s' "$PKGSPEC" | sha256sum | cut -c1-16)
}
download_all() {
    log "downloading into $DEBS"
    rm -rf "$DEBS"
    log "  kernel: $KPKG"
    download "$DEBS/kernel" "$KPKG" || return 1
    log "  qemu: $QPKGS"
    download "$DEBS/qemu" $QPKGS || return 1
    if [ -n "${QLIBS// /}" ]; then
        log "  qemu libraries missing on host: $QLIBS"
        download "$DEBS/qemu" $QLIBS || return 1
    fi
    log "  guest: $GTOP (+ libraries)"
    download "$DEBS/guest" $GTOP $GLIBS || return 1
}

if [ "$REFRESH" = 0 ] && [ -f "$PKGFILE" ] && [ -f "$CACHE/.stamp-fetch" ]; then
    # shellcheck disable=SC1090
    . "$PKGFILE"
    pkg_hash
else
    ensure_apt_lists
    resolve_and_record
fi

if stamp_ok fetch "$PKGHASH" && [ -d "$QROOT" ] && [ -d "$KROOT" ] && [ -d "$GROOT" ]; then
    log "packages already downloaded and unpacked ($PKGHASH)"
else
    if ! download_all; then
        # Stale apt lists name versions the mirror no longer has (kernel ABI
        # bumps, security updates): refresh the lists once and re-resolve.
        [ "$(id -u)" = 0 ] || die "download failed; 'sudo apt-get update' and re-run with --refresh"
        log "download failed; running apt-get update and re-resolving the package set"
        apt-get update -qq >&2 || die "apt-get update failed"
        resolve_and_record
        download_all || die "downloading the guest packages failed (see the apt messages above)"
    fi

    log "unpacking"
    unpack_all "$DEBS/kernel" "$KROOT"
    unpack_all "$DEBS/qemu" "$QROOT"
    unpack_all "$DEBS/guest" "$GROOT"
    stamp_set fetch "$PKGHASH"
    rm -f "$CACHE/.stamp-initramfs" "$CACHE/.stamp-qemucheck"
fi

# ---------------------------------------------------------------------------
# 4. Locate kernel + qemu, check qemu's libraries.
# ---------------------------------------------------------------------------
KVER=$(ls "$KROOT/lib/modules" 2>/dev/null | head -n1)
[ -n "$KVER" ] || die "no kernel modules found under $KROOT/lib/modules"
KERNEL="$KROOT/boot/vmlinuz-$KVER"
[ -f "$KERNEL" ] || die "kernel image $KERNEL not found"
MODDIR="$KROOT/lib/modules/$KVER"

QEMU_BIN="$QROOT/usr/bin/qemu-system-x86_64"
QEMU_MODULE_DIR="$QROOT/usr/lib/x86_64-linux-gnu/qemu"
[ -x "$QEMU_BIN" ] || die "qemu-system-x86_64 not found at $QEMU_BIN"
[ -f "$QEMU_MODULE_DIR/accel-tcg-x86_64.so" ] || log "warning: no accel-tcg-x86_64.so module in $QEMU_MODULE_DIR (TCG may be built in)"
QEMU_LD_LIBRARY_PATH="$QROOT/lib/x86_64-linux-gnu:$QROOT/usr/lib/x86_64-linux-gnu"
QEMU_DATA_DIRS="$QROOT/usr/share/seabios:$QROOT/usr/share/qemu"
[ -f "$QROOT/usr/share/seabios/bios-256k.bin" ] || die "seabios bios-256k.bin missing from $QROOT/usr/share/seabios"

if ! stamp_ok qemucheck "$PKGHASH"; then
    missing=$(LD_LIBRARY_PATH="$QEMU_LD_LIBRARY_PATH" ldd "$QEMU_BIN" "$QEMU_MODULE_DIR/accel-tcg-x86_64.so" 2>&1 | grep 'not found' | sort -u || true)
    [ -z "$missing" ] || die "qemu-system-x86_64 still misses shared libraries:
$missing"
    if ! out=$(LD_LIBRARY_PATH="$QEMU_LD_LIBRARY_PATH" QEMU_MODULE_DIR="$QEMU_MODULE_DIR" \
        "$QEMU_BIN" -L "$QROOT/usr/share/seabios" -L "$QROOT/usr/share/qemu" -accel help 2>&1); then
        die "qemu-system-x86_64 does not start: $out"
    fi
    echo "$out" | grep -qw tcg || die "qemu-system-x86_64 has no TCG accelerator (QEMU_MODULE_DIR=$QEMU_MODULE_DIR): $out"
    stamp_set qemucheck "$PKGHASH"
fi

# ---------------------------------------------------------------------------
# 5. Build the initramfs.
# ---------------------------------------------------------------------------
# Kernel modules the guest needs, in load order (deps first). Modules that
# are built into this kernel (modules.builtin) are skipped.
WANT_MODULES="virtio virtio_ring virtio_pci virtio_console nbd crc32c_generic ext4"

mod_path() { # module name -> path relative to $MODDIR (from modules.dep), or empty
    local n=$1 alt
    alt=$(echo "$n" | tr '_' '-')
    awk -F: -v a="$n" -v b="$alt" '{
        f=$1; sub(/.*\//,"",f); sub(/\.ko(\.(xz|zst|gz))?$/,"",f);
        if (f==a || f==b) {print $1; exit}
    }' "$MODDIR/modules.dep"
}
mod_builtin() {
    local n=$1 alt
    alt=$(echo "$n" | tr '_' '-')
    grep -qE "/($n|$alt)\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null
}
MOD_ORDER=""
add_module_path() { # relative path in modules.dep; adds deps first
    local rel=$1 deps d
    case " $MOD_ORDER " in *" $rel "*) return 0 ;; esac
    deps=$(awk -F: -v r="$rel" '$1==r {print $2; exit}' "$MODDIR/modules.dep")
    for d in $deps; do add_module_path "$d"; done
    MOD_ORDER="$MOD_ORDER $rel"
}

decompress_module() { # src dst
    case "$1" in
    *.ko.xz) xz -dc "$1" >"$2" 2>/dev/null || "$GROOT/bin/busybox" xzcat "$1" >"$2" ;;
    *.ko.zst) zstd -qdc "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *.ko) cp "$1" "$2" ;;
    *) die "unknown module format: $1" ;;
    esac
}

GUEST_BINS="bin/busybox usr/bin/socat sbin/nbd-client sbin/mke2fs sbin/e2fsck sbin/dumpe2fs"
IRHASH=$( {
    echo "$PKGHASH $FETCH_FORMAT $WANT_MODULES $GUEST_BINS"
    cat "$INIT_SRC" "${BASH_SOURCE[0]}"
} | sha256sum | cut -c1-16)

# The .debs do not ship modules.dep (postinst runs depmod); generate it
# with busybox's depmod so the host needs no kmod.
if [ ! -s "$MODDIR/modules.dep" ]; then
    log "generating modules.dep for $KVER"
    "$GROOT/bin/busybox" depmod -b "$KROOT" "$KVER" || die "depmod for $KVER failed"
    [ -s "$MODDIR/modules.dep" ] || die "depmod produced no $MODDIR/modules.dep"
fi

if stamp_ok initramfs "$IRHASH" && [ -f "$INITRD" ]; then
    log "initramfs up to date ($INITRD)"
else
    log "building initramfs"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,lib/modules,etc,dev,proc,sys,tmp,run,mnt,root}

    # Guest binaries (from the unpacked .debs, never from the host).
    for b in $GUEST_BINS; do
        [ -f "$GROOT/$b" ] || die "guest binary $b not found in unpacked packages ($GROOT)"
        cp -L "$GROOT/$b" "$STAGE/$b"
    done
    ln -sf mke2fs "$STAGE/sbin/mkfs.ext4"
    ln -sf e2fsck "$STAGE/sbin/fsck.ext4"
    [ -f "$GROOT/etc/mke2fs.conf" ] && cp "$GROOT/etc/mke2fs.conf" "$STAGE/etc/mke2fs.conf"

    # Their shared libraries, resolved with the guest's own dynamic loader
    # and library folders (so the host's libraries are never used).
    GLD="$GROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    [ -f "$GLD" ] || GLD="$GROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    [ -f "$GLD" ] || die "guest dynamic loader ld-linux-x86-64.so.2 not found in $GROOT"
    GLIBPATH="$GROOT/lib/x86_64-linux-gnu:$GROOT/usr/lib/x86_64-linux-gnu"
    libs=""
    for b in $GUEST_BINS; do
        [ "$b" = bin/busybox ] && continue # static
        out=$("$GLD" --inhibit-cache --library-path "$GLIBPATH" --list "$GROOT/$b" 2>&1) ||
            die "cannot list libraries of $b: $out"
        if echo "$out" | grep -q 'not found'; then
            die "guest binary $b misses libraries: $(echo "$out" | grep 'not found')"
        fi
        for l in $(echo "$out" | awk '/=>/ && $3 ~ /^\// {print $3}'); do
            case "$l" in
            "$GROOT"/*) libs="$libs $l" ;;
            *) die "library $l of $b resolved outside the unpacked guest packages; add its package to the guest set" ;;
            esac
        done
    done
    for l in $(echo "$libs" | tr ' ' '\n' | sort -u); do
        cp -L "$l" "$STAGE/lib/x86_64-linux-gnu/$(basename "$l")"
    done
    cp -L "$GLD" "$STAGE/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$STAGE/lib64/ld-linux-x86-64.so.2"

    # busybox applet links (only where no real binary exists)
    for a in $("$GROOT/bin/busybox" --list-full); do
        [ -e "$STAGE/$a" ] || [ -L "$STAGE/$a" ] && continue
        mkdir -p "$STAGE/$(dirname "$a")"
        ln -s /bin/busybox "$STAGE/$a"
    done

    # Kernel modules: decompressed (busybox insmod cannot read .ko.xz/.zst)
    # and listed in load order in /etc/meshdisk-modules.
    for m in $WANT_MODULES; do
        rel=$(mod_path "$m")
        if [ -n "$rel" ]; then
            add_module_path "$rel"
        elif mod_builtin "$m"; then
            :
        else
            die "kernel module $m is neither a module nor built into $KVER"
        fi
    done
    : >"$STAGE/etc/meshdisk-modules"
    for rel in $MOD_ORDER; do
        name=$(basename "$rel")
        name=${name%.xz}
        name=${name%.zst}
        name=${name%.gz}
        decompress_module "$MODDIR/$rel" "$STAGE/lib/modules/$name"
        echo "${name%.ko}" >>"$STAGE/etc/meshdisk-modules"
    done
    log "  modules: $(tr '\n' ' ' <"$STAGE/etc/meshdisk-modules")"
    grep -qx nbd "$STAGE/etc/meshdisk-modules" || mod_builtin nbd || die "nbd module missing"

    cp "$INIT_SRC" "$STAGE/init"
    chmod 0755 "$STAGE/init"
    echo "root:x:0:0:root:/root:/bin/sh" >"$STAGE/etc/passwd"
    echo "root:x:0:" >"$STAGE/etc/group"
    {
        echo "# kernel"
        deb_versions "$DEBS/kernel"
        echo "# qemu"
        deb_versions "$DEBS/qemu"
        echo "# guest"
        deb_versions "$DEBS/guest"
    } >"$CACHE/versions.txt"
    cp "$CACHE/versions.txt" "$STAGE/etc/meshdisk-versions"

    # cpio (newc) + gzip. Use the host cpio if present, else busybox's.
    if command -v cpio >/dev/null 2>&1; then
        CPIO=(cpio --quiet -o -H newc -R 0:0)
    else
        CPIO=("$GROOT/bin/busybox" cpio -o -H newc -R 0:0)
    fi
    (cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | "${CPIO[@]}" 2>/dev/null) | gzip -6 >"$INITRD.tmp" ||
        die "creating the initramfs cpio failed"
    [ -s "$INITRD.tmp" ] || die "empty initramfs"
    mv "$INITRD.tmp" "$INITRD"
    stamp_set initramfs "$IRHASH"
    log "  initramfs: $INITRD ($(du -h "$INITRD" | cut -f1))"
fi

# ---------------------------------------------------------------------------
# 6. guest.env for guest-test.sh
# ---------------------------------------------------------------------------
cat >"$ENVFILE.tmp" <<EOF
# generated by kernel-setup/fetch-guest.sh; sourced by guest-test.sh
GUEST_CACHE='$CACHE'
GUEST_KVER='$KVER'
GUEST_KERNEL='$KERNEL'
GUEST_INITRD='$INITRD'
GUEST_INITRD_HASH='$IRHASH'
GUEST_INIT_SHA256='$(sha256sum <"$INIT_SRC" | cut -d' ' -f1)'
QEMU_BIN='$QEMU_BIN'
QEMU_MODULE_DIR='$QEMU_MODULE_DIR'
QEMU_LD_LIBRARY_PATH='$QEMU_LD_LIBRARY_PATH'
QEMU_DATA_DIRS='$QEMU_DATA_DIRS'
EOF
mv "$ENVFILE.tmp" "$ENVFILE"
log "ready: $ENVFILE (kernel $KVER)"
