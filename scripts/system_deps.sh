#!/usr/bin/env bash
# Installs the Debian packages the test suite needs when they are missing: Chromium, which the web demo's
# browser test (tests/test_serve_web.py) drives through Playwright. Run by `make test` before pytest.
# As root, or with passwordless sudo, it installs them; otherwise it stops with one line saying what to run.
set -euo pipefail
CHROMIUM=${SPARSEVL_CHROMIUM:-/usr/bin/chromium}
PACKAGES="chromium"
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "make: missing Debian package $PACKAGES ($CHROMIUM, for the browser test); install it with: sudo apt-get install -y $PACKAGES" >&2
  exit 1
fi
echo "installing $PACKAGES (missing $CHROMIUM) ..."
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null
[ -x "$CHROMIUM" ] || { echo "make: apt-get installed $PACKAGES but $CHROMIUM is still missing" >&2; exit 1; }
