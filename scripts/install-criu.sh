#!/usr/bin/env bash
# Installs CRIU 4.2.1 (Debian sid) and the newer libraries it needs (from trixie) into a private
# prefix, without touching the system's apt state or libc. bookworm's criu 3.17 and trixie's 4.1.1
# fail on kernels >= 6.16 (see ARCHITECTURE.md). Idempotent: a prefix that already passes
# `criu --version` is left alone.
set -euo pipefail
PREFIX=${1:?usage: install-criu.sh PREFIX}
MIRROR=${TORPOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOADER="$PREFIX/usr/lib64/ld-linux-x86-64.so.2"
LIBPATH="$PREFIX/usr/lib/x86_64-linux-gnu:$PREFIX/lib/x86_64-linux-gnu"

if [ -x "$PREFIX/usr/sbin/criu" ] && "$LOADER" --library-path "$LIBPATH" "$PREFIX/usr/sbin/criu" --version 2>/dev/null | grep -q 'Version: 4\.2'; then
    exit 0
fi

SID_PKGS="criu libcompel1 libnet9 libnl-3-200"
TRIXIE_PKGS="libc6 libbsd0 libmd0 libgnutls30t64 libp11-kit0 libidn2-0 libunistring5 libtasn1-6 libnettle8t64 libhogweed6t64 libgmp10 libffi8 libnftables1 libmnl0 libnftnl11 libxtables12 libjansson4 libprotobuf-c1 libuuid1"

work="$PREFIX.apt"
mkdir -p "$work/etc/preferences.d" "$work/state/lists/partial" "$work/cache/archives/partial" "$work/debs"
cat > "$work/etc/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main
SRC
APT_OPTS=(-o "Dir::Etc::SourceList=$work/etc/sources.list" -o "Dir::Etc::SourceParts=-"
          -o "Dir::Etc::Preferences=$work/etc/preferences" -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
          -o "Dir::State=$work/state" -o "Dir::State::status=/dev/null" -o "Dir::Cache=$work/cache"
          -o "APT::Sandbox::User=root" -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "Acquire::Languages=none"
          -o "APT::Architecture=amd64" -o "APT::Architectures=amd64")
echo "torpor: fetching CRIU 4.2 package lists (private apt state in $work)" >&2
apt-get "${APT_OPTS[@]}" -qq update >&2
cd "$work/debs"
for p in $SID_PKGS; do apt-get "${APT_OPTS[@]}" -qq download "$p/sid" >&2; done
for p in $TRIXIE_PKGS; do apt-get "${APT_OPTS[@]}" -qq download "$p/trixie" >&2; done
mkdir -p "$PREFIX"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$PREFIX"; done
if ! "$LOADER" --library-path "$LIBPATH" "$PREFIX/usr/sbin/criu" --version | grep -q 'Version: 4\.2'; then
    echo "torpor: CRIU in $PREFIX does not run" >&2
    exit 1
fi
rm -rf "$work"
echo "torpor: installed $("$LOADER" --library-path "$LIBPATH" "$PREFIX/usr/sbin/criu" --version | head -1) into $PREFIX" >&2
