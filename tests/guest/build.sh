#!/bin/bash
# Build the end-to-end tests' tiny guest: a Debian cloud kernel and a busybox initramfs
# holding init, udhcpc.sh, lib.sh and agent.sh from this directory (see docs/e2e.md).
#
#   bash tests/guest/build.sh [WORK_DIR]    # default /var/tmp/monitor-guest
#
# Leaves WORK_DIR/vmlinuz and WORK_DIR/initrd.gz. Cached: the kernel package is downloaded
# (apt-get download + dpkg-deb -x, never installed: no initramfs-tools triggers) only when
# linux-image-cloud-amd64 points at a new one, and the initramfs is packed again only when
# one of its inputs changed. Run as root on Debian 12 (the recipe of real-components.md §3).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-/var/tmp/monitor-guest}
# virtio-blk's and virtio-net's modules and what they need, in load order (init loads them in
# this order too).
MODULES=(drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
         drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk
         net/core/failover drivers/net/net_failover drivers/net/virtio_net)
FILES=(init udhcpc.sh lib.sh agent.sh)

mkdir -p "$WORK"
exec 9> "$WORK/.lock"
flock 9  # two test runs at once build once

if [ ! -x /bin/busybox ] || ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null \
        | grep -q 'install ok installed'; then
    apt-get update -q > /dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends busybox-static \
        > /dev/null
fi

# The kernel package the meta-package depends on now, e.g. linux-image-6.1.0-56-cloud-amd64.
kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2> /dev/null \
        | awk '/Depends: linux-image-/ {print $2; exit}'
}
# Asking apt costs about a second (it rebuilds its cache), so the answer is kept until the
# package lists change.
lists=$(stat -c %Y /var/lib/apt/lists/*_Packages* 2> /dev/null | sort -n | tail -1 || true)
package=
if [ -n "$lists" ] && [ "$(head -1 "$WORK/kernel.package" 2> /dev/null)" = "$lists" ]; then
    package=$(sed -n 2p "$WORK/kernel.package")
fi
if [ -z "$package" ]; then
    package=$(kernel_package)
    if [ -z "$package" ]; then  # no package lists yet
        apt-get update -q > /dev/null
        package=$(kernel_package)
    fi
    lists=$(stat -c %Y /var/lib/apt/lists/*_Packages* 2> /dev/null | sort -n | tail -1 || true)
    printf '%s\n%s\n' "$lists" "$package" > "$WORK/kernel.package"
fi
[ -n "$package" ] || { echo "build.sh: no linux-image-cloud-amd64 in apt" >&2; exit 1; }
version=${package#linux-image-}

kernel_dir="$WORK/kernel-$version"
have_modules() {  # every module in MODULES is in the cached kernel (the list may have grown)
    for module in "${MODULES[@]}"; do
        [ -f "$kernel_dir/mods/${module##*/}.ko" ] || return 1
    done
}
if [ ! -f "$kernel_dir/vmlinuz" ] || ! have_modules; then
    echo "build.sh: downloading $package" >&2
    scratch=$(mktemp -d "$WORK/download.XXXXXX")
    trap 'rm -rf "$scratch"' EXIT
    # _apt cannot write to a root-only directory: apt then downloads as root, with a warning.
    if ! (cd "$scratch" && apt-get download -q "$package" > /dev/null 2>&1); then
        # Package lists older than the mirror: the file they name is gone. Refresh, ask again.
        apt-get update -q > /dev/null
        package=$(kernel_package)
        version=${package#linux-image-}
        kernel_dir="$WORK/kernel-$version"
        rm -f "$WORK/kernel.package"
        (cd "$scratch" && apt-get download -q "$package" > /dev/null)
    fi
    dpkg-deb -x "$scratch"/"$package"_*.deb "$scratch/root"
    mkdir -p "$scratch/kernel/mods"
    cp "$scratch"/root/boot/vmlinuz-* "$scratch/kernel/vmlinuz"
    for module in "${MODULES[@]}"; do
        cp "$scratch/root/lib/modules/$version/kernel/$module.ko" "$scratch/kernel/mods/"
    done
    rm -rf "$kernel_dir"
    mv "$scratch/kernel" "$kernel_dir"
    rm -rf "$scratch"
    trap - EXIT
    # Older kernels are not needed any more.
    find "$WORK" -maxdepth 1 -name 'kernel-*' ! -name "kernel-$version" -exec rm -rf {} +
fi

inputs=$( (cd "$HERE" && sha256sum "${FILES[@]}" build.sh; sha256sum /bin/busybox; echo "$version") \
    | sha256sum | cut -c1-16)
if [ "$(cat "$WORK/initrd.inputs" 2> /dev/null)" != "$inputs" ] || [ ! -f "$WORK/initrd.gz" ]; then
    echo "build.sh: packing the initramfs ($inputs)" >&2
    root=$(mktemp -d "$WORK/initrd.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,lib,mods}
    cp /bin/busybox "$root/bin/busybox"
    cp "$kernel_dir"/mods/*.ko "$root/mods/"
    install -m 0755 "$HERE/init" "$root/init"
    install -m 0755 "$HERE/udhcpc.sh" "$root/udhcpc.sh"
    install -m 0755 "$HERE/agent.sh" "$root/agent.sh"
    install -m 0644 "$HERE/lib.sh" "$root/lib/guest.sh"
    # No cpio binary on these machines: busybox's applet makes the newc archive.
    (cd "$root" && find . | busybox cpio -o -H newc 2> /dev/null | gzip -1 > "$WORK/initrd.gz.new")
    mv "$WORK/initrd.gz.new" "$WORK/initrd.gz"
    echo "$inputs" > "$WORK/initrd.inputs"
    rm -rf "$root"
    trap - EXIT
fi
# A stable path for the domain XML, whichever kernel version is cached.
ln -f "$kernel_dir/vmlinuz" "$WORK/vmlinuz"
echo "$WORK"
