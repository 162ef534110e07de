# Shared by the scripts in images/ (sourced, not run): installing missing Debian packages,
# bookworm-backports (QEMU 10 and the Raspberry Pi 5 capable kernel come from there), and running
# arm64 programs on this x86_64 machine through qemu-user and binfmt_misc.
# shellcheck shell=bash

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# The calling script's name, for messages.
me=${0##*/}

die() {
  echo "$me: $*" >&2
  exit 1
}

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# need_pkgs [-t SUITE] PKG...: installs the packages that are missing (from SUITE if given).
need_pkgs() {
  local suite=() missing=() p
  if [ "${1:-}" = -t ]; then
    suite=(-t "$2")
    shift 2
  fi
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  echo "$me: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${suite[@]}" "${missing[@]}" >/dev/null \
    || die "could not install ${missing[*]}"
}

# need_backports: adds bookworm-backports to apt's sources. bookworm's QEMU 7.2 conflicts with the
# newer qemu-utils some machines carry; backports' QEMU 10 fits, and it has raspi4b emulation.
need_backports() {
  apt-cache policy 2>/dev/null | grep -q bookworm-backports && return 0
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
  $SUDO apt-get update -qq
}

# need_qemu_system ARCH: qemu-system-ARCH (x86_64 or aarch64) from bookworm-backports.
need_qemu_system() {
  command -v "qemu-system-$1" >/dev/null && return 0
  need_backports
  case $1 in
    x86_64) need_pkgs -t bookworm-backports qemu-system-x86 ;;
    aarch64) need_pkgs -t bookworm-backports qemu-system-arm ;;
    *) die "no QEMU for $1" ;;
  esac
}

# need_binfmt_arm64: lets this machine run arm64 programs directly (mmdebstrap --arch=arm64,
# chroot into an arm64 root) through qemu-user-static. `update-binfmts` does not work here (no
# binfmt-support entry), so the handler from /usr/lib/binfmt.d is registered by hand; its F flag
# makes it work inside chroots. See research lab-build.md §2.
need_binfmt_arm64() {
  need_pkgs qemu-user-static
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || die "cannot mount binfmt_misc (needed to run arm64 programs here)"
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || die "no $conf (qemu-user-static)"
    grep -v '^#' "$conf" | $SUDO tee /proc/sys/fs/binfmt_misc/register >/dev/null \
      || die "cannot register the qemu-aarch64 binfmt_misc handler"
  fi
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "the qemu-aarch64 binfmt_misc handler is disabled"
}

# elf_machine FILE: prints the ELF machine of FILE (x86_64, aarch64) or "unknown".
elf_machine() {
  case $(od -An -t x1 -j 18 -N 2 "$1" 2>/dev/null | tr -d ' \n') in
    3e00) echo x86_64 ;;
    b700) echo aarch64 ;;
    *) echo unknown ;;
  esac
}

# Sizes of an image as docs/PERFORMANCE.md reports them.
image_sizes() {
  printf '%s apparent, %s allocated, %s zstd -10' \
    "$(du -h --apparent-size "$1" | cut -f1)" "$(du -h "$1" | cut -f1)" \
    "$(zstd -q -10 -T0 -c "$1" | wc -c | awk '{printf "%.0f MB", $1/1e6}')"
}

# mmdebstrap options that make the initramfs once, at the end of the build. Under qemu-user one
# mkinitramfs run over a generic arm64 kernel takes many minutes (every modinfo and realpath call
# is an emulated process), and dpkg triggers from later packages ask for a second run: so
# update-initramfs is diverted to a no-op while packages are installed, then restored and run.
# shellcheck disable=SC2016,SC2034
initramfs_once=(
  --essential-hook='chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && printf "#!/bin/sh\nexit 0\n" > "$1/usr/sbin/update-initramfs" && chmod 0755 "$1/usr/sbin/update-initramfs"'
  --customize-hook='rm "$1/usr/sbin/update-initramfs" && chroot "$1" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs && chroot "$1" update-initramfs -c -k all'
)
