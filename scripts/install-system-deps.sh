#!/usr/bin/env bash
# System libraries a headless Linux machine lacks for napari's Qt window: Xvfb (a virtual
# display) and the xcb/OpenGL libraries Qt loads. Debian/Ubuntu only; a desktop has them already.
set -euo pipefail
packages=(xvfb xauth libgl1 libegl1 libfontconfig1 libdbus-1-3 libxkbcommon-x11-0
  libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
  libxcb-xinerama0 libxcb-xkb1 libxcb-shape0 libxcb-cursor0)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install-system-deps: no apt-get; install Xvfb and Qt's xcb libraries yourself: ${missing[*]}" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "install-system-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
