#!/bin/sh
# Install GNU Mailman 3 core into its own virtualenv (default: .venv-mailman
# at the repository root) for the Mailman list-freeze actuator and its tests.
#
# Mailman gets a venv of its own because its pinned dependencies (SQLAlchemy,
# falcon, zope.*, aiosmtpd ...) must not fight Faust's in .venv.
# Idempotent and quiet once done: a stamp file records the installed version.
#
#   deploy/mailman/install.sh            # install or do nothing
#   MAILMAN_VENV=/opt/mailman deploy/mailman/install.sh
set -eu

ROOT=$(CDPATH= cd -- "$(dirname -- "$0")/../.." && pwd)
VENV=${MAILMAN_VENV:-$ROOT/.venv-mailman}
PYTHON=${PYTHON:-python3}
VERSION=${MAILMAN_VERSION:-3.3.10}
# Mailman 3.3.10's held-message queries (REST .../held) fail with SQLAlchemy 2.1 ("FROM expression
# expected, got Select"): keep it on the 2.0 series it was released against.
SQLALCHEMY=${MAILMAN_SQLALCHEMY:-SQLAlchemy>=2.0,<2.1}
STAMP="$VENV/.installed-mailman-$VERSION-sqlalchemy-2.0"

if [ -f "$STAMP" ] && [ -x "$VENV/bin/mailman" ]; then
    exit 0
fi

echo "mailman: installing Mailman $VERSION core into $VENV (one-off)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Keep the venv out of git without touching the project's .gitignore.
printf '*\n' > "$VENV/.gitignore"

log="$VENV/install.log"
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input \
        "mailman==$VERSION" "$SQLALCHEMY" >"$log" 2>&1; then
    echo "mailman: pip install mailman==$VERSION failed; see $log" >&2
    tail -n 20 "$log" >&2
    exit 1
fi
if ! "$VENV/bin/mailman" --version >>"$log" 2>&1; then
    echo "mailman: installed, but \`mailman --version\` fails; see $log" >&2
    tail -n 20 "$log" >&2
    exit 1
fi
touch "$STAMP"
