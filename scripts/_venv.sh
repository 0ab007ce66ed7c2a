# Sourced by the set-up scripts: install into the active virtual environment, or create and use ./.venv when none
# is active (so nothing lands in the system Python). CI activates a fresh one of its own before calling them.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "accel set-up: creating a virtual environment in $(pwd)/.venv (activate it later with: source .venv/bin/activate)"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
