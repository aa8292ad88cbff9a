#!/usr/bin/env bash
# Provision a Debian or Ubuntu machine (the Vagrant box, or tools/vm_test's QEMU guest) to run
# rswap on its distribution kernel, then run the kernel test suite as root.
#
#   sudo vagrant/provision.sh [--install-only | --test-only] [SRC] [-- PYTEST ARGS]
#
# SRC is the rswap checkout (default: the directory above this script; /vagrant in the box).
# Steps, each skipped when already done (a second run goes straight to the tests):
#   1. apt: bcc from the distribution (python3-bpfcc, never PyPI's "bcc"), bpftool, the headers of
#      the *running* distribution kernel (its own, not another version's), iproute2, systemd.
#   2. checks: cgroup v2 unified on /sys/fs/cgroup (rswap's v2 writers: cpu.max, io.max,
#      memory.high), bpffs, tracefs, resctrl mounted when the CPU has RDT.
#   3. a venv (RSWAP_VENV, default /opt/rswap-venv) with --system-site-packages, so the
#      distribution's bcc imports, and rswap installed editable with its test extras; the wheels
#      of its build requirements kept in the venv.
#   4. RSWAP_REQUIRE_KERNEL=1 pytest -v tests/kernel, offline (pip finds the build requirements
#      kept in the venv by 3, and no index): a line per test; a skipped kernel test fails
#      the run; a test over its timeout fails with its stacks (tests/conftest.py).
#      RSWAP_TEST_TIME_SCALE (stretch wall-clock pacing on a slow, emulated guest) and
#      RSWAP_CRASH_ROUNDS pass through to the tests; tools/vm_test sets them under TCG.
# --install-only stops after 3 without touching mounts (tools/vm_test runs it in a chroot, where
# apt and pip run at native speed, before it boots the guest); --test-only runs 2 and 4.
set -euo pipefail

say() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

mode=all
src=""
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --install-only) mode=install ;;
        --test-only) mode=test ;;
        --) shift; pytest_args=("$@"); break ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) src=$1 ;;
    esac
    shift
done
src=${src:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
venv=${RSWAP_VENV:-/opt/rswap-venv}
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages, loads BPF, writes cgroups)"
[ -f "$src/pyproject.toml" ] || die "$src is not an rswap checkout (no pyproject.toml)"

# The kernel whose headers bcc needs.  In a chroot (install-only) uname -r is the host's kernel,
# so take the newest distribution kernel installed in the tree instead.
kernel_version() {
    local k
    k=$(uname -r)
    if [ "$mode" = install ] && [ ! -d "/lib/modules/$k/kernel" ]; then
        k=$(ls /lib/modules 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    printf '%s' "$k"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

install_packages() {
    local kver pkgs=() missing=() id
    kver=$(kernel_version)
    id=$(. /etc/os-release && echo "$ID")
    pkgs=(python3-bpfcc iproute2 python3-venv python3-pip util-linux kmod systemd ca-certificates)
    case "$id" in
        ubuntu) pkgs+=(linux-tools-common "linux-tools-$kver") ;;  # Ubuntu's bpftool
        *) pkgs+=(bpftool) ;;
    esac
    if [ -n "$kver" ]; then
        pkgs+=("linux-headers-$kver")
    else
        pkgs+=(linux-headers-amd64)
    fi
    for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ -n "$kver" ] && [ ! -e "/lib/modules/$kver/build/include" ]; then
        die "no headers for kernel $kver under /lib/modules/$kver/build (linux-headers-$kver)"
    fi
    say "kernel $kver with its own headers: /lib/modules/$kver/build"
}

install_venv() {
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv (system site packages, for the distribution's bcc)"
        python3 -m venv --system-site-packages "$venv"
    fi
    local stamp="$venv/.rswap-provision-stamp" want
    want=$(sha256sum "$src/pyproject.toml" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
        say "installing rswap-ebpf[test] from $src into $venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$src[test]"
        echo "$want" > "$stamp"
    fi
    # The build backend a wheel build needs (pyproject's [build-system] requires: setuptools>=77,
    # newer than Debian's), kept as wheels in the venv: pip's isolated build environment
    # installs it from there, with no index (tools/vm_test's guest has no network at all).
    local wheels="$venv/share/rswap-build-wheels" reqs req_list
    reqs=$("$venv/bin/python" -c 'import sys, tomllib; print(*tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"], sep="\n")' "$src/pyproject.toml")
    if [ "$(cat "$wheels/.requires" 2>/dev/null || true)" != "$reqs" ]; then
        say "keeping the build requirements in $wheels for offline wheel builds: $(echo $reqs)"
        rm -rf "$wheels"
        mapfile -t req_list <<< "$reqs"
        "$venv/bin/python" -m pip download -q --disable-pip-version-check --only-binary :all: \
            -d "$wheels" "${req_list[@]}"
        printf '%s' "$reqs" > "$wheels/.requires"
    fi
    "$venv/bin/python" -c 'import bcc, sys; f = bcc.__file__; sys.exit(0 if "/dist-packages/" in f and hasattr(bcc, "BPF") else f"bcc comes from {f}, not the distribution")'
    ln -sfn "$venv/bin/rswap" /usr/local/bin/rswap
}

check_mounts() {
    local fs
    fs=$(stat -fc %T /sys/fs/cgroup)
    if [ "$fs" != cgroup2fs ]; then
        die "/sys/fs/cgroup is $fs, not cgroup v2 (boot with systemd.unified_cgroup_hierarchy=1)"
    fi
    say "cgroup v2 unified; controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
    mountpoint -q /sys/fs/bpf || { mount -t bpf bpf /sys/fs/bpf; say "mounted bpffs"; }
    if [ ! -e /sys/kernel/tracing/events ] && [ ! -e /sys/kernel/debug/tracing/events ]; then
        mount -t tracefs tracefs /sys/kernel/tracing
        say "mounted tracefs"
    fi
    if grep -qwE 'rdt_a|cat_l3|mba' /proc/cpuinfo; then
        if ! mountpoint -q /sys/fs/resctrl; then
            mount -t resctrl resctrl /sys/fs/resctrl && say "mounted resctrl on /sys/fs/resctrl"
        fi
    else
        say "resctrl: this CPU has no RDT (no rdt_a/cat_l3/mba flag); cache and membw tests use the fake"
    fi
}

run_tests() {
    cd "$src"
    say "running the kernel tests on $(uname -r) as root"
    set +e
    # pip in a test (the wheel test builds rswap's wheel) works offline: build requirements come
    # from the venv's wheels (install_venv), never from an index.
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$venv/share/rswap-build-wheels"
    # A Python that dies of a signal (SIGSEGV, SIGABRT, in bcc or numpy) prints its stacks to
    # its stderr, which the tests show when it fails.
    export PYTHONFAULTHANDLER=1
    # -v: one line per test, so a console shows where the run is; every test has a timeout
    # (tests/conftest.py), stretched by RSWAP_TEST_TIME_SCALE.
    RSWAP_REQUIRE_KERNEL=1 "$venv/bin/python" -m pytest -p no:cacheprovider -v -ra --durations=20 \
        "${pytest_args[@]:-tests/kernel}"
    local rc=$?
    set -e
    say "kernel tests finished with status $rc"
    return $rc
}

case "$mode" in
    install) install_packages; install_venv ;;
    test) check_mounts; run_tests ;;
    all) install_packages; install_venv; check_mounts; run_tests ;;
esac
