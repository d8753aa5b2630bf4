#!/usr/bin/env bash
# The system packages scripts/test and scripts/demo need, installed with apt-get where
# they are missing. Usage: scripts/_system_deps.sh GROUP...
#
#   venv   python3 and its venv module (Debian ships ensurepip apart, in python3-venv),
#          to create .venv; nothing while .venv exists.
#   netns  ip (iproute2) and nft (nftables): the namespace tests (tests/test_netns.py,
#          test_lan.py, test_discovery.py, test_lan_avahi.py) build hosts with ip and
#          NAT routers with nft; miniupnpd (miniupnpd-nftables): the port-mapping test
#          (tests/test_portmap_netns.py) runs it in a router (NAT-PMP and PCP).
#   avahi  avahi-daemon, avahi-browse and avahi-publish (avahi-utils), dbus-daemon (dbus),
#          unshare (util-linux), mount: tests/test_lan_avahi.py runs Avahi on a private
#          D-Bus in a testbed namespace, our only proof that another mDNS stack hears us.
#   audio  pulseaudio, pactl/paplay/parec (pulseaudio-utils), the ALSA pulse plugin
#          (libasound2-plugins) and PortAudio (libportaudio2): tests/test_audio_devices.py
#          calls through virtual microphones and speakers of a PulseAudio server it
#          starts, and sounddevice (the [audio] extra) needs PortAudio.
#
# It prints one line per package it installs and why. Only root on a machine with
# apt-get installs anything; anywhere else it says what is missing and how to get it,
# and carries on: those tests then skip saying why, or fail under CI=true
# (tests/required_groups.py). `apt-get update` runs at most once, and only when
# something is to be installed.
#
# apt-get install runs with --no-install-recommends (avahi-daemon recommends
# libnss-mdns, which edits /etc/nsswitch.conf) and under a temporary
# /usr/sbin/policy-rc.d that says no, so that installing avahi-daemon or dbus does not
# start a system daemon on the machine's real network where an init system runs. The
# tests start their own, inside namespaces.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

packages=()  # Debian packages to install, each once
reasons=()   # why, one line per package, same order

need() {  # need PACKAGE WHY: add PACKAGE unless it is already listed
    local p
    for p in "${packages[@]+"${packages[@]}"}"; do
        [ "$p" = "$1" ] && return 0
    done
    packages+=("$1")
    reasons+=("$2")
}

need_command() {  # need_command COMMAND PACKAGE WHY (sbin too: not on a user's PATH)
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] \
        || need "$2" "$1 not found; $3"
}

for group in "$@"; do
    case "$group" in
    venv)
        if [ -x "$ROOT/.venv/bin/python" ]; then
            :
        elif ! command -v "$PY" >/dev/null 2>&1; then
            need python3 "$PY not found; it creates .venv"
            need python3-venv "python3's venv module creates .venv"
        elif ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
            need python3-venv "$PY has no venv/ensurepip module; it creates .venv"
        fi
        ;;
    netns)
        why="the namespace tests (tests/test_netns.py, test_lan*.py, test_discovery.py)"
        need_command ip iproute2 "$why build hosts with it"
        need_command nft nftables "$why build NAT routers with it"
        need_command miniupnpd miniupnpd-nftables \
            "tests/test_portmap_netns.py runs it in a NAT router (NAT-PMP, PCP)"
        ;;
    avahi)
        why="tests/test_lan_avahi.py runs Avahi in a namespace"
        need_command avahi-daemon avahi-daemon "$why"
        need_command avahi-browse avahi-utils "$why"
        need_command avahi-publish avahi-utils "$why"
        need_command dbus-daemon dbus "$why, on a private D-Bus"
        need_command unshare util-linux "$why, in a private mount namespace"
        need_command mount mount "$why, with a tmpfs over /run"
        ;;
    audio)
        why="tests/test_audio_devices.py calls through a private PulseAudio's null sinks"
        need_command pulseaudio pulseaudio "$why"
        need_command pactl pulseaudio-utils "$why (pactl, paplay, parec)"
        need_command parec pulseaudio-utils "$why (pactl, paplay, parec)"
        ls /usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so >/dev/null 2>&1 \
            || need libasound2-plugins "ALSA's pulse plugin: PortAudio reaches PulseAudio through it"
        ls /usr/lib/*/libportaudio.so.2 >/dev/null 2>&1 \
            || need libportaudio2 "PortAudio: sounddevice (p2pd[audio]) opens devices through it"
        ;;
    *)
        echo "scripts/_system_deps.sh: unknown group '$group' (venv, netns, avahi, audio)" >&2
        exit 2
        ;;
    esac
done

[ "${#packages[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then why="not root"; else why="no apt-get here"; fi
    for i in "${!packages[@]}"; do
        echo "missing: ${packages[$i]} (${reasons[$i]})" >&2
    done
    echo "not installing them ($why); on Debian, as root:" \
        "apt-get install --no-install-recommends ${packages[*]}" >&2
    echo "carrying on: the tests that need them skip, saying why (under CI=true they fail)" >&2
    exit 0
fi

for i in "${!packages[@]}"; do
    echo "installing ${packages[$i]}: ${reasons[$i]}" >&2
done
policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    trap 'rm -f "$policy"' EXIT
    printf '#!/bin/sh\n# scripts/_system_deps.sh: start no service while installing\nexit 101\n' \
        >"$policy"
    chmod +x "$policy"
fi
rc=0
{ apt-get update -q >&2 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${packages[@]}" >&2; } || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "warning: apt-get failed (exit $rc) installing ${packages[*]};" \
        "the tests that need them skip, saying why (under CI=true they fail)" >&2
fi
exit 0
